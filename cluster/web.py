"""The scheduler's web page on `web_port`: the jobs a token may see, each job's live progress, previews and
results, grids of them, and cancel.

The page (cluster/web/: plain HTML, JS and CSS, no build step) is public; every /api route takes the API's
tokens as `Authorization: Bearer TOKEN`, checked like a gRPC call's, and answers 401 without one. Another
user's job is a 404, exactly as a job that does not exist. Job ids and result names come from users: an id
must look like one, a name must be one of the job's results, and no path is ever built from either.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from PIL import Image

from renderfarm import grid
from renderfarm._constants import AUTHORIZATION_KEY
from renderfarm.cluster import http
from renderfarm.cluster.constants import SAFE_ID_PATTERN
from renderfarm.cluster.jobs import STATE_TO_PB
from renderfarm.cluster.keys import User
from renderfarm.cluster.server import FarmStopping
from renderfarm.v1 import farm_pb2 as pb

if TYPE_CHECKING:
    from renderfarm.cluster.jobs import JobRecord
    from renderfarm.cluster.server import RenderFarmService
    from renderfarm.spec import AnySpec

# The longest side of a thumbnail, in pixels (the page shows them at up to 160 CSS pixels).
THUMBNAIL_SIDE = 192
# Jobs a list shows by default (the newest), and at most (?limit=).
DEFAULT_LISTED_JOBS = 200
MAX_LISTED_JOBS = 1000
# An event stream writes a heartbeat line after this long without an event, so that a page that went away is
# noticed (a write fails) and its listener dropped, and proxies keep the connection open.
HEARTBEAT_S = 15.0
# At most this many images go into one grid request: each is read and decoded in the scheduler's process.
MAX_GRID_IMAGES = 256
# Result names are file names the farm made (a slug, a seed and a hash); anything longer is none of them.
MAX_NAME_CHARS = 255
# Reading a result back from an object store (its presigned URL) for a thumbnail or a grid.
URL_READ_TIMEOUT_S = 30.0

STATIC_FILES = {"/": ("index.html", "text/html"), "/static/app.js": ("app.js", "text/javascript"),
                "/static/style.css": ("style.css", "text/css")}  # fmt: skip
# The page's own files only: images from blob: and data: URLs (and an object store's presigned URLs).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data: https: http:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SAFE_ID = re.compile(SAFE_ID_PATTERN)
STATE_NAMES = {number: state for state, number in STATE_TO_PB.items()}
# Where the authenticated caller is kept on a request (typed keys are aiohttp 3.14's; a string before).
USER = web.RequestKey("user", User) if hasattr(web, "RequestKey") else "renderfarm.user"
# The first spec fields offered as a grid's axes, in this order; any other field that varies follows.
AXIS_ORDER = ("prompt", "seed", "guidance_scale", "steps", "scheduler", "model", "negative_prompt", "loras",
              "strength", "noise_level", "width", "height")  # fmt: skip


# -- plain helpers (tests/unit/test_web.py) ---------------------------------------------------------------------


def job_json(job: JobRecord) -> dict:
    """A job as the list shows it."""
    message = job.to_pb()
    return {
        "id": job.id,
        "kind": message.WhichOneof("kind") or "",
        "state": job.state.value,
        "finished": job.state.finished,
        "owner": job.owner,
        "completed": job.completed,
        "total": job.total,
        "created_at": job.created_at,
        "priority": job.priority,
        "error": job.error,
    }


def job_detail_json(job: JobRecord) -> dict:
    """A job as its page shows it: what was asked (its kind's fields, inputs left out), its result names in
    the order they were made, and the spec fields that vary among them (a grid's axes)."""
    message = job.to_pb()
    kind = message.WhichOneof("kind")
    results = list(job.results())
    return job_json(job) | {
        "request": MessageToDict(getattr(message, kind), preserving_proto_field_name=True) if kind else {},
        "preview_every": message.preview_every,
        "results": [name for name, _ in results],
        "axes": varying_fields(spec for _, spec in results),
    }


def varying_fields(specs: Iterable[AnySpec]) -> list[str]:
    """The spec fields whose values are not all the same, the usual sweep axes first."""
    seen: dict[str, set[str]] = {}
    for spec in specs:
        for field, value in spec.fields().items():
            seen.setdefault(field, set()).add(json.dumps(value, sort_keys=True))
    varying = [field for field, values in seen.items() if len(values) > 1]
    return sorted(varying, key=lambda field: (AXIS_ORDER.index(field) if field in AXIS_ORDER else len(AXIS_ORDER), field))


def event_json(event: pb.JobEvent) -> dict:
    """One line of a job's event stream; a preview's PNG as base64 (for a data: URL)."""
    kind = event.WhichOneof("kind")
    line: dict = {"kind": kind, "seq": event.seq}
    if kind == "state":
        state = STATE_NAMES.get(event.state)
        line |= {"state": state.value if state else "unknown", "finished": bool(state and state.finished),
                 "error": event.error}  # fmt: skip
    elif kind == "progress":
        line |= {"completed": event.progress.completed, "total": event.progress.total}
    elif kind == "result":
        line |= {"name": event.result.name}
    elif kind == "step_progress":
        progress = event.step_progress
        line |= {"step": progress.step, "steps": progress.steps, "names": list(progress.names)}
    elif kind == "preview":
        preview = event.preview
        line |= {"name": preview.name, "step": preview.step, "steps": preview.steps,
                 "png": base64.b64encode(preview.png).decode()}  # fmt: skip
    return line


def thumbnail(png: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """A PNG of at most `side` pixels a side (never enlarged), without the result's text chunks."""
    with Image.open(io.BytesIO(png)) as image:
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue()


def is_job_id(text: str) -> bool:
    return SAFE_ID.fullmatch(text) is not None


# -- the app ---------------------------------------------------------------------------------------------------


def _error(status: type[web.HTTPException], message: str, **headers) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json", headers=headers or None)


def _png_bytes(result: pb.ImageResult) -> bytes:
    """A result's PNG: from the local store's bytes, or read from the object store's presigned URL. Blocks."""
    if result.png or not result.url:
        return result.png
    with urllib.request.urlopen(result.url, timeout=URL_READ_TIMEOUT_S) as response:
        return response.read()


def _int(text: str | None, default: int, low: int, high: int, name: str) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _error(web.HTTPBadRequest, f"{name}: must be an integer from {low} to {high} (got {text[:40]!r})")
    return value


async def _heartbeats(events: AsyncIterator, interval_s: float) -> AsyncIterator:
    """The events as they come, and None after each `interval_s` without one. Waiting never cancels the
    iterator's step, which would end it."""
    next_event = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait((next_event,), timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                event = next_event.result()
            except StopAsyncIteration:
                return
            yield event
            next_event = asyncio.ensure_future(anext(events))
    finally:
        next_event.cancel()
        await asyncio.gather(next_event, return_exceptions=True)
        await events.aclose()


class WebPage:
    """The routes; each /api handler runs for an authenticated caller (request[USER])."""

    def __init__(self, service: RenderFarmService):
        self._service = service
        folder = resources.files("renderfarm.cluster") / "web"
        self._files = {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in STATIC_FILES.items()}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        app.on_response_prepare.append(self._headers)
        for path in STATIC_FILES:
            app.router.add_get(path, self.static)
        app.router.add_get("/api/me", self.me)
        app.router.add_get("/api/jobs", self.jobs)
        app.router.add_get("/api/jobs/{job_id}", self.job)
        app.router.add_get("/api/jobs/{job_id}/events", self.events)
        app.router.add_get("/api/jobs/{job_id}/images/{name}", self.image)
        app.router.add_get("/api/jobs/{job_id}/specs/{name}", self.spec)
        app.router.add_get("/api/jobs/{job_id}/grid.png", self.grid)
        app.router.add_post("/api/jobs/{job_id}/cancel", self.cancel)
        return app

    @staticmethod
    async def _headers(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler):
        if request.path.startswith("/api/"):
            sent = request.headers.get("Authorization")
            caller = self._service.users.authenticate([(AUTHORIZATION_KEY, sent or "")])
            # An open farm takes any token; a change still needs the header, which no other site's form sends.
            if caller is None or (request.method != "GET" and sent is None):
                raise _error(web.HTTPUnauthorized, "a token is needed: Authorization: Bearer TOKEN",
                             **{"WWW-Authenticate": "Bearer"})  # fmt: skip
            request[USER] = caller
        return await handler(request)

    async def static(self, request: web.Request) -> web.Response:
        body, kind = self._files[request.path]
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})

    def _job(self, request: web.Request) -> JobRecord:
        job_id = request.match_info["job_id"]
        job = self._service.visible_job(job_id, request[USER]) if is_job_id(job_id) else None
        if job is None:
            raise _error(web.HTTPNotFound, f"no job {job_id[:80]!r}")
        return job

    async def _result(self, request: web.Request, job: JobRecord) -> tuple[AnySpec, pb.ImageResult]:
        name = request.match_info["name"]
        found = await asyncio.to_thread(self._service.result, job, name) if len(name) <= MAX_NAME_CHARS else None
        if found is None:
            raise _error(web.HTTPNotFound, f"job {job.id} has no result {name[:80]!r}")
        return found

    async def me(self, request: web.Request) -> web.Response:
        caller: User = request[USER]
        return web.json_response({"name": caller.name, "role": caller.role})

    async def jobs(self, request: web.Request) -> web.Response:
        """The newest jobs the caller may see, newest first (?owner= only theirs, ?limit= how many)."""
        limit = _int(request.query.get("limit"), DEFAULT_LISTED_JOBS, 1, MAX_LISTED_JOBS, "limit")
        visible = self._service.visible_jobs(request[USER], request.query.get("owner", ""))
        listed = [job_json(job) for job in reversed(visible[-limit:])]
        return web.json_response({"jobs": listed, "count": len(visible)})

    async def job(self, request: web.Request) -> web.Response:
        return web.json_response(job_detail_json(self._job(request)))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The job's events as JSON lines from ?after_seq= (0: all of them), live ones among them, until its
        final state; a {"kind": "stopping"} line if the scheduler stops first (the page resumes from its last
        seq), and a heartbeat line every HEARTBEAT_S of quiet."""
        job = self._job(request)
        after_seq = _int(request.query.get("after_seq"), 0, 0, 2**63 - 1, "after_seq")
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        # A page that went away: the next write fails, and the stream (and its listener) ends.
        with contextlib.suppress(ConnectionResetError):
            try:
                events = self._service.job_events(job, after_seq, live=True, images=False)
                async for event in _heartbeats(events, HEARTBEAT_S):
                    line = {"kind": "heartbeat"} if event is None else event_json(event)
                    await response.write(json.dumps(line).encode() + b"\n")
            except FarmStopping:
                await response.write(json.dumps({"kind": "stopping"}).encode() + b"\n")
            await response.write_eof()
        return response

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A result's PNG (an object store's: a redirect to its presigned URL); ?thumb=1: a small one."""
        job = self._job(request)
        _, result = await self._result(request, job)
        cache = {"Cache-Control": "private, max-age=3600"}  # a name is a function of the pixels' spec
        if request.query.get("thumb") in ("1", "true"):
            small = await asyncio.to_thread(lambda: thumbnail(_png_bytes(result)))
            return web.Response(body=small, content_type="image/png", headers=cache)
        if not result.png and result.url:
            raise web.HTTPFound(result.url)
        return web.Response(body=result.png, content_type="image/png", headers=cache)

    async def spec(self, request: web.Request) -> web.Response:
        """A result's spec, its A1111 parameters line, and an object store's URL of it (the page shows that
        directly: a cross-origin fetch would need the bucket's CORS)."""
        job = self._job(request)
        spec, result = await self._result(request, job)
        body = {"name": result.name, "spec": spec.fields(), "parameters": spec.a1111_parameters()}
        if not result.png and result.url:
            body["url"] = result.url
        return web.json_response(body)

    async def grid(self, request: web.Request) -> web.Response:
        """A contact sheet of the job's results: ?x= a spec field across, ?y= one down (optional), ?sheet= which
        sheet (0 first); the X-Sheets header says how many there are."""
        job = self._job(request)
        x, y = request.query.get("x", ""), request.query.get("y") or None
        sheet = _int(request.query.get("sheet"), 0, 0, MAX_GRID_IMAGES, "sheet")
        results = list(job.results())
        names = [name for name, _ in results]
        if not names:
            raise _error(web.HTTPNotFound, f"job {job.id} has no results yet")
        if len(names) > MAX_GRID_IMAGES:
            raise _error(web.HTTPBadRequest,
                         f"job {job.id} has {len(names)} results; grids here are of {MAX_GRID_IMAGES} at most")  # fmt: skip
        try:
            png, count = await asyncio.to_thread(self._grid_png, job, names, x, y, sheet)
        except ValueError as error:
            raise _error(web.HTTPBadRequest, str(error)) from None
        if png is None:
            raise _error(web.HTTPNotFound, f"sheet: there are {count} sheets (got {sheet})")
        return web.Response(body=png, content_type="image/png", headers={"X-Sheets": str(count)})

    def _grid_png(self, job: JobRecord, names: list[str], x: str, y: str | None, sheet: int):
        """(PNG of the sheet, or None past the last, and the number of sheets). Blocks: reads every result."""
        pairs = []
        for name in names:
            found = self._service.result(job, name)
            if found is not None:
                spec, result = found
                with Image.open(io.BytesIO(_png_bytes(result))) as image:
                    pairs.append((spec, image.convert("RGB")))
        sheets = grid.grids(pairs, x, y)
        if sheet >= len(sheets):
            return None, len(sheets)
        return sheets[sheet].png(), len(sheets)

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.state.finished:
            raise _error(web.HTTPConflict, f"job {job.id} already ended {job.state.value}")
        self._service.cancel(job)
        return web.json_response(job_json(job))


async def serve(service: RenderFarmService, host: str, port: int) -> http.HttpServer:
    """The web page and its API on host:port (0: a free port), on the farm's event loop."""
    return await http.serve(WebPage(service).app(), host, port)
