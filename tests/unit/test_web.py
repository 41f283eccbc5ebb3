"""The web page's API without Ray: the real service over a real job store and result store, a fake engine."""

import asyncio
import io
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from renderfarm._wire import JobState
from renderfarm.cluster import web
from renderfarm.cluster.auth import Users
from renderfarm.cluster.jobs import JobStore
from renderfarm.cluster.keys import add_user
from renderfarm.cluster.live import LiveEvents
from renderfarm.cluster.results import LocalResultStore
from renderfarm.cluster.server import RenderFarmService
from renderfarm.spec import ImageSpec, encode_png
from renderfarm.v1 import farm_pb2 as pb


class FakeEngine:
    def __init__(self):
        self.live = LiveEvents()
        self.cancelled = []

    def cancel(self, job):
        job.request_cancel()
        self.cancelled.append(job.id)


def _spec(seed: int, guidance_scale: float = 7.5) -> ImageSpec:
    return ImageSpec("builtin:tiny-sd", "a fox", "", seed, 256, 128, 2, guidance_scale, "ddim")


class Farm:
    """Alice's job with two results (finished), Bob's running job without any."""

    def __init__(self, directory):
        keys = directory / "keys.toml"
        self.tokens = {name: add_user(keys, name) for name in ("alice", "bob")}
        self.jobs = JobStore(directory / "state")
        self.store = LocalResultStore(directory / "output")
        self.engine = FakeEngine()
        self.service = RenderFarmService(None, self.jobs, self.store, self.engine, Users(keys, None))
        request = pb.SubmitJobRequest(sweep=pb.SweepSpec(model="builtin:tiny-sd", prompts=["a fox"]))
        self.alices = self.jobs.create(request, 2, owner="alice")
        self.bobs = self.jobs.create(request, 3, owner="bob")
        self.bobs.change_state(JobState.RUNNING)
        specs = [_spec(0), _spec(1, 9.0)]
        self.store.write(self.alices.id, [(spec, encode_png(Image.new("RGB", (256, 128), "red"), spec)) for spec in specs])
        self.jobs.add_results([(self.alices, spec, spec.file_name, None) for spec in specs])
        self.alices.change_state(JobState.RUNNING)
        self.alices.change_state(JobState.SUCCEEDED)
        self.names = [spec.file_name for spec in specs]

    def headers(self, user: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


@pytest.fixture
def farm(tmp_path):
    farm = Farm(tmp_path)
    yield farm
    farm.jobs.close()


def _run(farm, check):
    async def main():
        async with TestClient(TestServer(web.WebPage(farm.service).app())) as client:
            await check(client)

    asyncio.run(main())


def test_the_page_is_public_and_the_api_takes_a_token(farm):
    async def check(client):
        page = await client.get("/")
        assert page.status == 200 and "token-form" in await page.text()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert (await client.get("/static/app.js")).status == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": farm.tokens["alice"]}):
            response = await client.get("/api/jobs", headers=headers)
            assert response.status == 401 and "token" in (await response.json())["error"]
        me = await client.get("/api/me", headers=farm.headers("bob"))
        assert await me.json() == {"name": "bob", "role": "member"}

    _run(farm, check)


def test_a_member_lists_and_opens_only_their_own_jobs(farm):
    async def check(client):
        listed = await (await client.get("/api/jobs", headers=farm.headers("alice"))).json()
        assert [job["id"] for job in listed["jobs"]] == [farm.alices.id]
        job = listed["jobs"][0]
        assert (job["kind"], job["state"], job["owner"], job["completed"], job["total"]) == (
            "sweep", "succeeded", "alice", 2, 2,
        )  # fmt: skip
        detail = await (await client.get(f"/api/jobs/{farm.alices.id}", headers=farm.headers("alice"))).json()
        assert detail["results"] == farm.names and detail["axes"] == ["seed", "guidance_scale"]
        assert detail["request"]["prompts"] == ["a fox"]
        # Another user's job, an unknown one and one that is no id: the same 404.
        for job_id in (farm.bobs.id, "0" * 16, "..%2F..%2Fetc", "x" * 65):
            response = await client.get(f"/api/jobs/{job_id}", headers=farm.headers("alice"))
            assert response.status == 404, job_id
        response = await client.get(f"/api/jobs/{farm.bobs.id}/images/{farm.names[0]}", headers=farm.headers("alice"))
        assert response.status == 404

    _run(farm, check)


def test_images_thumbnails_and_specs_of_a_result_and_nothing_else(farm):
    async def check(client):
        base, headers = f"/api/jobs/{farm.alices.id}", farm.headers("alice")
        full = await client.get(f"{base}/images/{farm.names[0]}", headers=headers)
        assert full.content_type == "image/png"
        assert (await full.read()) == (farm.store.job_dir(farm.alices.id) / farm.names[0]).read_bytes()
        thumb = await client.get(f"{base}/images/{farm.names[0]}?thumb=1", headers=headers)
        with Image.open(io.BytesIO(await thumb.read())) as image:
            assert image.size == (web.THUMBNAIL_SIDE, web.THUMBNAIL_SIDE // 2)
        spec = await (await client.get(f"{base}/specs/{farm.names[1]}", headers=headers)).json()
        assert spec["spec"]["guidance_scale"] == 9.0 and "CFG scale: 9" in spec["parameters"]
        for name in ("manifest.jsonl", "..%2Fjobs.sqlite3", "nope.png"):
            assert (await client.get(f"{base}/images/{name}", headers=headers)).status == 404, name

    _run(farm, check)


def test_cancel_an_unfinished_job_and_refuse_a_finished_one(farm):
    async def check(client):
        refused = await client.post(f"/api/jobs/{farm.alices.id}/cancel", headers=farm.headers("alice"))
        assert refused.status == 409 and "already ended succeeded" in (await refused.json())["error"]
        assert (await client.post(f"/api/jobs/{farm.bobs.id}/cancel", headers=farm.headers("alice"))).status == 404
        cancelled = await client.post(f"/api/jobs/{farm.bobs.id}/cancel", headers=farm.headers("bob"))
        assert cancelled.status == 200 and farm.engine.cancelled == [farm.bobs.id]

    _run(farm, check)


def test_events_stream_as_json_lines_until_the_final_state(farm):
    async def check(client):
        response = await client.get(f"/api/jobs/{farm.alices.id}/events", headers=farm.headers("alice"))
        assert response.content_type == "application/x-ndjson"
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
        assert [line["kind"] for line in lines] == ["state", "result", "result", "progress", "state", "state"]
        assert [line["name"] for line in lines if line["kind"] == "result"] == farm.names
        assert lines[-1] == {"kind": "state", "seq": 6, "state": "succeeded", "finished": True, "error": ""}
        after = await client.get(f"/api/jobs/{farm.alices.id}/events?after_seq=5", headers=farm.headers("alice"))
        assert [json.loads(line)["seq"] for line in (await after.text()).splitlines()] == [6]
        bad = await client.get(f"/api/jobs/{farm.alices.id}/events?after_seq=-1", headers=farm.headers("alice"))
        assert bad.status == 400

    _run(farm, check)


def test_a_preview_event_carries_its_png_as_base64():
    event = pb.JobEvent(job_id="j", preview=pb.Preview(name="a.png", step=2, steps=6, png=b"\x89PNG"))
    assert web.event_json(event) == {"kind": "preview", "seq": 0, "name": "a.png", "step": 2, "steps": 6, "png": "iVBORw=="}
