"""The `renderfarm` command. Farm-side commands (up, serve, an embedded sweep, models) need renderfarm[cluster]."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import platformdirs
from tqdm import tqdm

from renderfarm._constants import DEFAULT_ADDRESS, DEFAULT_INPAINTER, DEFAULT_MODEL, DEFAULT_UPSCALER
from renderfarm._wire import Event, JobState, JobStatus, Preview, Progress, Result, StateChange, StepProgress
from renderfarm.client import Client, Job
from renderfarm.errors import (
    AuthenticationError,
    CapacityError,
    FarmUnavailableError,
    InvalidJobError,
    JobFailedError,
    JobNotFoundError,
    PermissionDeniedError,
    RenderfarmError,
)
from renderfarm.spec import MANIFEST, SPEC_CHUNK, AnySpec, manifest_line, spec_from_json

# Without a terminal, progress is a line this often (seconds).
PLAIN_LINE_EVERY_S = 5.0
PREVIEW_HELP = "a preview of each image every N denoising steps, saved in OUT/previews/; 0: none"
# The commands that run a farm of their own when no farm address is set.
EMBEDDABLE = ("sweep", "img2img", "inpaint", "upscale", "decode")

# The exit codes the README documents, for scripts to branch on.
EXIT_OK = 0
EXIT_JOB_FAILED = 1  # the job failed or was cancelled, or the farm answered with another error
EXIT_USAGE = 2  # argparse's own code; also a bad value, file or configuration, or an extra this install lacks
EXIT_UNREACHABLE = 3  # the farm cannot be reached, or refuses the token or the call
EXIT_INVALID = 4  # the farm refused the request as wrong: resubmitting it will not help
EXIT_CAPACITY = 5  # the farm is at a limit, or the caller at a quota: retry later or ask for less
EXIT_INTERRUPTED = 130  # the shells' code for a command ended by SIGINT
ERROR_EXIT_CODES = (
    (JobFailedError, EXIT_JOB_FAILED),
    (FarmUnavailableError, EXIT_UNREACHABLE),
    (AuthenticationError, EXIT_UNREACHABLE),
    (PermissionDeniedError, EXIT_UNREACHABLE),
    (InvalidJobError, EXIT_INVALID),
    (JobNotFoundError, EXIT_INVALID),
    (CapacityError, EXIT_CAPACITY),
    (RenderfarmError, EXIT_JOB_FAILED),
)
CLUSTER_EXTRA = "pip install 'renderfarm[cluster]'"


class MissingDependencyError(Exception):
    """The command needs a package this install lacks (exit EXIT_USAGE)."""


class ResultStoreUnreachableError(FarmUnavailableError):
    """A result could not be fetched from the farm's result store, though the farm itself answered."""


@contextlib.contextmanager
def _needs_cluster_extra(what: str, otherwise: str = "") -> Iterator[None]:
    """Turns a farm-side import failing on a thin install (no ray, torch, diffusers) into one line naming the extra."""
    try:
        yield
    except ModuleNotFoundError as error:
        message = f"{what} needs the cluster extra (no module {error.name!r}): {CLUSTER_EXTRA}{otherwise}"
        raise MissingDependencyError(message) from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is no value to show (None, False, ""): there the
    help says what happens instead, e.g. "default: the model's native size"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "":  # `is`: 0 == False
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with defaults in its help; add_subparsers makes its subcommands' parsers of this class
    too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def parse_ints(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,5,9' -> [0, 5, 9]; both mix: '0-2,7'."""
    values = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            values.extend(range(int(first), int(last) + 1) if dash else [int(first)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers or ranges like 0-3,7") from None
    return values


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def parse_lora(text: str) -> tuple[str, float]:
    """'PATH:SCALE' -> (PATH, SCALE); a bare PATH has scale 1. The last ':' splits, so paths may hold colons."""
    path, colon, scale = text.rpartition(":")
    if not colon:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return text, 1.0  # a colon in the path, no scale


def parse_names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _data_home() -> Path:
    return Path(platformdirs.user_data_dir("renderfarm"))


def _cache_home() -> Path:
    return Path(platformdirs.user_cache_dir("renderfarm"))


def _add_farm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("farm (up, or an embedded farm)")
    group.add_argument("--encoders", type=int, default=1, help="text encoder replicas")
    group.add_argument("--denoisers", type=int, default=1, help="denoiser replicas")
    group.add_argument("--decoders", type=int, default=1, help="VAE decoder replicas")
    group.add_argument("--upscalers", type=int, default=1, help="x4 upscaler replicas")
    group.add_argument("--max-batch", type=int, default=8, help="images per denoiser batch")
    group.add_argument("--gpus-per-replica", type=float, default=0.0, help="num_gpus of each replica")
    group.add_argument("--output-dir", type=Path, default=_data_home() / "output", help="the farm's result store")
    group.add_argument("--output", metavar="s3://BUCKET/PREFIX", help="store results in a bucket instead (boto3's AWS_* settings)")
    group.add_argument("--model-cache-dir", type=Path, default=_cache_home() / "models", help="builtin model cache")
    group.add_argument(
        "--state-dir",
        type=Path,
        help=f"the durable job store; `up` defaults to {_data_home() / 'state'}, an embedded farm to a temporary one",
    )
    group.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")


def _add_client_options(parser: argparse.ArgumentParser, *, embeddable: bool = False) -> None:
    group = parser.add_argument_group("connection (a token comes from $RENDERFARM_TOKEN)")
    if embeddable:
        where = group.add_mutually_exclusive_group()
        where.add_argument(
            "--address",
            help="HOST:PORT (or grpcs://HOST:PORT) of a running farm (default: $RENDERFARM_ADDRESS; "
            "with neither, a farm runs here for the command)",
        )
        where.add_argument(
            "--local", action="store_true", help="run a farm here for the command, even with $RENDERFARM_ADDRESS set"
        )
    else:
        group.add_argument(
            "--address",
            help=f"HOST:PORT or grpcs://HOST:PORT of the farm (default: $RENDERFARM_ADDRESS, else {DEFAULT_ADDRESS})",
        )
    group.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the farm's TLS; implies TLS ($RENDERFARM_TLS_CA)")
    group.add_argument("--tls-client-cert", type=Path, help="client certificate (PEM), for a farm requiring mTLS")
    group.add_argument("--tls-client-key", type=Path, help="the client certificate's key (PEM)")


def _client(args) -> Client:
    return Client(
        args.address,
        root_certificates=args.tls_ca,
        client_certificate=args.tls_client_cert,
        client_key=args.tls_client_key,
    )


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("users and TLS (see the README's Teams)")
    group.add_argument("--keys-file", type=Path, help="the users' keys file (renderfarm keys add); re-read when it changes")
    group.add_argument("--tls-cert", type=Path, help="the farm's certificate chain (PEM): serve TLS only")
    group.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    group.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    group.add_argument("--health-port", type=int, help="also serve gRPC health alone, in plaintext, on this port")
    group.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics on this port")
    group.add_argument("--web-port", type=int, default=8090, help="the web page on this port")


def farm_config(args, state_dir: Path, *, host: str = "127.0.0.1", port: int = 0, **serving):
    from renderfarm.cluster.config import ConfigValueError, FarmConfig, PoolConfig

    def pool(name: str) -> PoolConfig:
        try:
            return PoolConfig(replicas=getattr(args, name), num_gpus=args.gpus_per_replica)
        except ConfigValueError as error:  # named as in farm.toml: denoisers.replicas
            raise error.under(f"{name}.") from None

    return FarmConfig(
        output_dir=None if args.output else args.output_dir,
        output=args.output,
        model_cache_dir=args.model_cache_dir,
        state_dir=state_dir,
        host=host,
        port=port,
        ray_address=args.ray_address,
        max_batch=args.max_batch,
        encoders=pool("encoders"),
        denoisers=pool("denoisers"),
        decoders=pool("decoders"),
        upscalers=pool("upscalers"),
        **serving,
    )


def _up_config(args):
    from renderfarm.cluster.config import AuthConfig

    return farm_config(
        args,
        args.state_dir or _data_home() / "state",
        host=args.host,
        port=args.port,
        auth=AuthConfig(keys_file=args.keys_file),
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        web_port=args.web_port,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="renderfarm", description="Render Stable Diffusion sweeps on a farm.")
    parser.add_argument("--version", action="version", version=f"renderfarm {importlib.metadata.version('renderfarm')}")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run a scheduler and a local Ray instance in the foreground")
    up.add_argument("--host", default="127.0.0.1", help="the interface to serve on")
    up.add_argument("--port", type=int, default=50051, help="the gRPC port (0: a free one)")
    _add_serving_options(up)
    _add_farm_options(up)

    serve = commands.add_parser("serve", help="run a scheduler configured by a farm.toml (e.g. joining a Ray cluster)")
    serve.add_argument("--config", type=Path, required=True, help="the farm.toml (see the README's keys)")

    priority_help = "higher runs first; strict between levels, shared fairly within one"
    sweep = commands.add_parser("sweep", help="render every combination of prompts x seeds x settings")
    prompts = sweep.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line")
    # A string default goes through `type`, so help shows it as it is typed: 0, not [0].
    sweep.add_argument("--seeds", type=parse_ints, default="0", help="e.g. 0-3 or 0,5,9")
    sweep.add_argument("--guidance", type=parse_floats, help="guidance scales, e.g. 5,7.5 (default: 7.5)")
    sweep.add_argument("--steps", type=parse_ints, help="denoising steps, e.g. 30 or 20,30 (default: 50)")
    sweep.add_argument("--width", type=parse_ints, help="default: the model's native size")
    sweep.add_argument("--height", type=parse_ints, help="default: the model's native size")
    sweep.add_argument("--negative", default="", help="the negative prompt")
    sweep.add_argument("--scheduler", type=parse_names, help="ddim, pndm, lms, euler, euler_a, dpmpp_2m (default: the model's)")
    sweep.add_argument("--model", action="append", help=f"builtin:NAME, a diffusers directory, s3://BUCKET/PREFIX/ or a HF repo id; repeat it for a models axis (default: {DEFAULT_MODEL})")
    sweep.add_argument("--lora", type=parse_lora, action="append", metavar="PATH[:SCALE]", help="a LoRA (.safetensors on the farm's file system) applied to every image (repeatable: applied together; scale default 1)")
    sweep.add_argument("--lora-scales", type=parse_floats, help="with one --lora: its scale as an axis, e.g. 0,0.5,1")
    sweep.add_argument("--out", type=Path, required=True, help="directory for the PNGs and manifest.jsonl")
    _add_client_options(sweep, embeddable=True)
    sweep.add_argument("--priority", type=int, default=0, metavar="N", help=priority_help)
    sweep.add_argument("--preview-every", type=int, default=0, metavar="N", help=PREVIEW_HELP)
    chained = sweep.add_argument_group("upscale each image 4x in the farm (its prompt, negative prompt and seed)")
    chained.add_argument("--upscale", type=int, help="4: the results are the 4x images (default: no upscale)")
    chained.add_argument("--upscale-model", default=DEFAULT_UPSCALER, help="an x4 upscaler")
    chained.add_argument("--upscale-noise-level", type=int, help="noise added to each image (default: 20)")
    chained.add_argument("--upscale-steps", type=int, help="the upscale's denoising steps (default: 75)")
    chained.add_argument("--upscale-guidance", type=float, help="the upscale's guidance scale (default: 9)")
    chained.add_argument("--upscale-tile", type=int, help="UNet tile side in input pixels (default: 128)")
    _add_farm_options(sweep)

    decode = commands.add_parser("decode", help="decode latents (.npy, [1, C, h, w]) into one image, in tiles")
    decode.add_argument("latents", type=Path, help="a NumPy .npy file of latents as the denoiser makes them")
    decode.add_argument("--model", default=DEFAULT_MODEL, help="the model whose VAE decodes")
    decode.add_argument("--out", type=Path, required=True, help="directory for the PNG and manifest.jsonl")
    decode.add_argument("--tile", type=int, help="tile core side in pixels (default: 512)")
    decode.add_argument("--overlap", type=int, help="halo around each tile in pixels (default: exact)")
    _add_client_options(decode, embeddable=True)
    decode.add_argument("--priority", type=int, default=0, metavar="N", help=priority_help)
    _add_farm_options(decode)

    upscale = commands.add_parser("upscale", help="upscale images 4x with a diffusion upscaler")
    upscale.add_argument("images", type=Path, nargs="+", help="input images")
    upscale.add_argument("--out", type=Path, required=True, help="directory for the PNGs and manifest.jsonl")
    upscale.add_argument("--prompt", default="", help="what the image shows (default: empty)")
    upscale.add_argument("--negative", default="", help="the negative prompt")
    upscale.add_argument("--noise-level", type=int, help="noise added to the input (default: 20)")
    upscale.add_argument("--steps", type=int, help="denoising steps (default: 75)")
    upscale.add_argument("--guidance", type=float, help="guidance scale (default: 9)")
    upscale.add_argument("--seed", type=int, default=0, help="the seed of the noise added")
    upscale.add_argument("--model", default=DEFAULT_UPSCALER, help="an x4 upscaler")
    upscale.add_argument("--tile", type=int, help="UNet tile side in input pixels (default: 128)")
    _add_client_options(upscale, embeddable=True)
    upscale.add_argument("--priority", type=int, default=0, metavar="N", help=priority_help)
    _add_farm_options(upscale)

    img2img = commands.add_parser("img2img", help="render images again from prompts: prompts x strengths x seeds x settings")
    img2img.add_argument("images", type=Path, nargs="+", help="source images (an axis)")
    _add_edit_options(img2img, DEFAULT_MODEL, "0.8", priority_help)
    inpaint = commands.add_parser("inpaint", help="repaint an image where a mask is white, with an inpainting model")
    inpaint.add_argument("image", type=Path, help="the image")
    inpaint.add_argument("--mask", type=Path, required=True, help="the image's size; white = repaint")
    _add_edit_options(inpaint, DEFAULT_INPAINTER, "1", priority_help)

    json_help = "print each job as a JSON object with every JobStatus field (jobs: one object per line)"
    jobs = commands.add_parser("jobs", help="list the farm's jobs (a member's own; an admin's: everyone's)")
    jobs.add_argument("--owner", help="only this user's jobs (admins)")
    jobs.add_argument("--json", action="store_true", help=json_help)
    _add_client_options(jobs)
    for name, text in (("status", "show a job"), ("cancel", "cancel a job"), ("watch", "follow a job to its end"),
                       ("delete", "remove a finished job and its results from the farm")):  # fmt: skip
        command = commands.add_parser(name, help=text)
        command.add_argument("job_id")
        _add_client_options(command)
        if name != "delete":
            command.add_argument("--json", action="store_true", help=json_help)
        if name == "watch":
            command.add_argument("--out", type=Path, help="also save the job's results here")

    grid = commands.add_parser("grid", help="a labelled contact sheet of a sweep's results (one spec field across, one down)")
    grid.add_argument("job", help="a job's id, or a directory of results (PNGs the farm made)")
    grid.add_argument("--x", required=True, help="the spec field across, e.g. seed")
    grid.add_argument("--y", help="the spec field down, e.g. guidance_scale (default: one row)")
    grid.add_argument("--out", type=Path, required=True, help="the PNG; with more sheets (other fields vary) OUT-1.png, OUT-2.png, ...")
    _add_client_options(grid)

    keys = commands.add_parser("keys", help="the users of a keys file (their tokens, roles, shares and quotas)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="add a user; prints their new token, once")
    add.add_argument("name")
    add.add_argument("--role", choices=("member", "admin"), default="member", help="admins see every job")
    add.add_argument("--weight", type=float, default=1.0, help="their share against other users'")
    add.add_argument("--max-concurrent-jobs", type=int, help="quota: jobs queued or running at once")
    add.add_argument("--max-images-per-day", type=int, help="quota: images submitted in any 24 h")
    remove = keys_commands.add_parser("remove", help="remove a user; their token stops working")
    remove.add_argument("name")
    listing = keys_commands.add_parser("list", help="the users, without their tokens")
    for command in (add, remove, listing):
        command.add_argument("--keys-file", type=Path, required=True, help="the keys file (TOML), created mode 0600")

    models = commands.add_parser("models", help="model references")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    path = models_commands.add_parser("path", help="print the local diffusers directory a reference resolves to")
    path.add_argument("ref", help="builtin:NAME, a diffusers directory, s3://BUCKET/PREFIX/ or a HF repo id")
    path.add_argument("--model-cache-dir", type=Path, default=_cache_home() / "models", help="builtin model cache")
    return parser


class JobProgress:
    """A job's progress on stderr: images done (the running batches' steps count as fractions of an image),
    the latest batch's step, images/s, steps/s and ETA. A tqdm bar on a terminal; elsewhere (a log, CI) a
    plain line every PLAIN_LINE_EVERY_S, since carriage returns make a log unreadable."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.completed, self._stream = total, 0, stream
        self._running: dict[str, tuple[int, int]] = {}  # image name -> (its last step reported, its steps)
        self._finished: set[str] = set()  # a step report can arrive after its image's result
        self._steps_done = 0  # summed over images
        self._step = ""
        self._started = self._printed = time.monotonic()
        self._bar = tqdm(total=total, file=stream, dynamic_ncols=True, bar_format="{bar}| {postfix}") if stream.isatty() else None

    def on_event(self, event: Event) -> None:
        if isinstance(event, StepProgress):
            for name in set(event.names) - self._finished:
                before = self._running.get(name, (0, 0))[0]
                if event.step < before:  # its batch was retried from the start
                    before = 0
                self._steps_done += event.step - before
                self._running[name] = (event.step, event.steps)
            self._step = f"step {event.step}/{event.steps}"
        elif isinstance(event, Result):
            # A batch's last steps are not reported: its results say they are done.
            step, steps = self._running.pop(event.name, (0, 0))
            self._steps_done += steps - step
            self._finished.add(event.name)
            self.completed = min(self.completed + 1, self.total)  # until the Progress that follows says
            if not self._running:
                self._step = ""
        elif isinstance(event, Progress):
            self.completed, self.total = event.completed, event.total
        else:
            return
        self._show()

    def line(self) -> str:
        done = self._done()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = done / elapsed
        parts = [f"{self.completed}/{self.total} images", self._step, f"{rate:.2f} images/s",
                 f"{self._steps_done / elapsed:.1f} steps/s" if self._steps_done else "",
                 f"ETA {tqdm.format_interval((self.total - done) / rate)}" if rate > 0 and done < self.total else ""]  # fmt: skip
        return ", ".join(part for part in parts if part)

    def _done(self) -> float:
        """Images done, a running image counting the fraction of its steps done."""
        return min(self.completed + sum(step / max(steps, 1) for step, steps in self._running.values()), self.total)

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.line(), refresh=False)
            self._bar.update(self._done() - self._bar.n)
        elif time.monotonic() - self._printed >= PLAIN_LINE_EVERY_S:
            self._printed = time.monotonic()
            print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.line())
            self._bar.close()
        else:
            print(self.line(), file=self._stream, flush=True)


def _manifest_name(line: str) -> str | None:
    """The result a manifest line is about; None for a line that is not one (cut short by a kill, say)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("file") if isinstance(entry, dict) and isinstance(entry.get("file"), str) else None


class Manifest:
    """DIR/manifest.jsonl with one line per result, however often results are saved into DIR: a re-run of a
    command, or `watch --out`, into the same directory appends only the names it lacks."""

    def __init__(self, directory: Path):
        self._path = directory / MANIFEST
        text = self._path.read_text(encoding="utf-8") if self._path.exists() else ""
        self._names: set[str] = set()
        kept = []
        for line in text.splitlines(keepends=True):
            name = _manifest_name(line)
            if name is not None and name not in self._names:
                self._names.add(name)
                kept.append(line if line.endswith("\n") else line + "\n")
        if "".join(kept) != text:
            # Duplicates an earlier renderfarm appended, or a line a kill cut short: replaced whole, so a
            # kill now leaves the old file or the new one, never a mix.
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, delete=False) as clean:
                clean.write("".join(kept))
            os.replace(clean.name, self._path)
        self._file = open(self._path, "a", encoding="utf-8")

    def add(self, name: str, spec: AnySpec) -> None:
        if name not in self._names:
            self._file.write(manifest_line(name, spec))
            self._file.flush()
            self._names.add(name)

    def close(self) -> None:
        self._file.close()


def follow(job: Job, out: Path | None) -> int:
    """Follows the job to its end with progress on stderr; with `out`, saves its results there (PNG and a
    manifest line each, once however often it is saved there) and its previews under out/previews/. Returns
    the images done; raises JobFailedError if the job fails."""
    progress = JobProgress(job.total)
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(out)
            stack.callback(manifest.close)
        for event in job.events(images=out is not None):
            progress.on_event(event)
            if out is not None and isinstance(event, Result):
                try:
                    event.save(out)
                except FarmUnavailableError as error:
                    raise ResultStoreUnreachableError(str(error)) from None
                manifest.add(event.name, event.spec)
            elif out is not None and isinstance(event, Preview):
                previews = out / "previews"
                previews.mkdir(exist_ok=True)
                (previews / f"{Path(event.name).stem}-step{event.step:03d}.png").write_bytes(event.png)
            elif isinstance(event, StateChange) and event.state == JobState.FAILED:
                raise JobFailedError(job.id, event.error)
    return progress.completed


def _on_farm(args, submit: Callable[[Client], Job]) -> int:
    """Submits to the farm at --address, or to an embedded one; saves the results into --out."""

    def run(client: Client) -> int:
        job = submit(client)
        try:
            print(f"job {job.id}: {job.total} images -> {args.out}", file=sys.stderr)
            saved = follow(job, args.out)
        except KeyboardInterrupt:
            if args.address:  # an embedded farm's job ends with it; a running farm's goes on
                print(f"renderfarm: job {job.id} goes on at the farm: `renderfarm watch {job.id} --out {args.out}` "
                      f"saves the rest, `renderfarm cancel {job.id}` stops it", file=sys.stderr)  # fmt: skip
            raise
        status = job.status()
        print(f"job {job.id} {status.state.value}: {saved} images in {args.out}", file=sys.stderr)
        return EXIT_OK if status.state == JobState.SUCCEEDED else EXIT_JOB_FAILED

    if args.address:
        print(f"renderfarm: using the farm at {args.address}", file=sys.stderr)
        with _client(args) as client:
            return run(client)
    if args.local:
        print("renderfarm: --local: running a local farm for this command", file=sys.stderr)
    else:
        print("renderfarm: no farm address set (--address or RENDERFARM_ADDRESS): running a local farm for this command",
              file=sys.stderr)  # fmt: skip
    # An embedded farm's jobs end with the command: left in a lasting store, a later
    # command's farm would resume them.
    with contextlib.ExitStack() as stack:
        state_dir = args.state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="renderfarm-")))
        with _needs_cluster_extra("running a farm here", " (or give --address of a running farm)"):
            from renderfarm.cluster.embedded import EmbeddedFarm

            # A farm for one command serves no page and no metrics: nobody would read them.
            farm = stack.enter_context(EmbeddedFarm(farm_config(args, state_dir, metrics_port=None, web_port=None)))
        return run(stack.enter_context(Client(farm.address)))


def _decode(args) -> int:
    try:
        import numpy as np
    except ModuleNotFoundError:
        # The thin SDK leaves numpy out: client.decode() takes an array its caller made with numpy already.
        raise MissingDependencyError(f"decode reads {args.latents} with numpy, which this install lacks: "
                                     f"pip install numpy (or {CLUSTER_EXTRA})") from None  # fmt: skip

    latents = np.load(args.latents, allow_pickle=False)
    return _on_farm(
        args,
        lambda client: client.decode(
            latents, model=args.model, tile=args.tile, overlap=args.overlap, priority=args.priority
        ),
    )


def _add_edit_options(parser: argparse.ArgumentParser, model: str, strength: str, priority_help: str) -> None:
    """The axes img2img and inpaint share."""
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    parser.add_argument("--strength", type=parse_floats, help=f"how far each image is noised, in (0, 1], e.g. 0.3,0.6 (default: {strength})")
    parser.add_argument("--seeds", type=parse_ints, default="0", help="e.g. 0-3 or 0,5,9")
    parser.add_argument("--guidance", type=parse_floats, help="guidance scales, e.g. 5,7.5 (default: 7.5)")
    parser.add_argument("--steps", type=parse_ints, help="denoising steps before the strength cuts them (default: 50)")
    parser.add_argument("--negative", default="", help="the negative prompt")
    parser.add_argument("--scheduler", type=parse_names, help="ddim, pndm, lms, euler, euler_a, dpmpp_2m (default: the model's)")
    parser.add_argument("--model", default=model, help="builtin:NAME, a diffusers directory, s3://BUCKET/PREFIX/ or a HF repo id")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PNGs and manifest.jsonl")
    _add_client_options(parser, embeddable=True)
    parser.add_argument("--priority", type=int, default=0, metavar="N", help=priority_help)
    parser.add_argument("--preview-every", type=int, default=0, metavar="N", help=PREVIEW_HELP)
    _add_farm_options(parser)


def _edit(args) -> int:
    axes = dict(
        strength=args.strength, seeds=args.seeds, guidance_scale=args.guidance, steps=args.steps,
        negative_prompt=args.negative, scheduler=args.scheduler, model=args.model, priority=args.priority,
        preview_every=args.preview_every,
    )  # fmt: skip

    def submit(client: Client) -> Job:
        if args.command == "inpaint":
            return client.inpaint(args.image, args.mask, args.prompt, **axes)
        return client.img2img(args.images, args.prompt, **axes)

    return _on_farm(args, submit)


def _upscale(args) -> int:
    def submit(client: Client) -> Job:
        return client.upscale(
            args.images,
            prompt=args.prompt,
            negative_prompt=args.negative,
            noise_level=args.noise_level,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            model=args.model,
            tile=args.tile,
            priority=args.priority,
        )

    return _on_farm(args, submit)


def _sweep(args) -> int:
    if args.prompts_file:
        prompts = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    else:
        prompts = args.prompt
    if (args.width is None) != (args.height is None):
        raise ValueError("sweep: give both --width and --height, or neither")  # before any farm starts

    def submit(client: Client) -> Job:
        return client.sweep(
            prompts,
            seeds=args.seeds,
            guidance_scale=args.guidance,
            steps=args.steps,
            width=args.width,
            height=args.height,
            negative_prompt=args.negative,
            scheduler=args.scheduler,
            model=args.model or DEFAULT_MODEL,
            loras=args.lora,
            lora_scales=args.lora_scales,
            upscale=args.upscale,
            upscale_model=args.upscale_model,
            upscale_noise_level=args.upscale_noise_level,
            upscale_steps=args.upscale_steps,
            upscale_guidance_scale=args.upscale_guidance,
            upscale_tile=args.upscale_tile,
            priority=args.priority,
            preview_every=args.preview_every,
        )

    return _on_farm(args, submit)


def _serve(config) -> int:
    """Runs a farm in the foreground until SIGINT or SIGTERM, then stops it gracefully (`up`, `serve`)."""
    import asyncio
    import logging
    import signal

    from renderfarm.cluster.server import Farm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        # The same variable the SDK sends its token from: a farm started with it requires it.
        farm = Farm(config, token=os.environ.get("RENDERFARM_TOKEN"))
        await farm.start()
        print(f"renderfarm serving on {farm.address}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        await farm.serve_until(stop)

    from renderfarm.cluster.executor import ClusterGoneError

    try:
        asyncio.run(serve())
    except ClusterGoneError as error:
        # Retrying into a dead cluster helps no one: exit, for the supervisor (Kubernetes, systemd) to restart.
        print(f"renderfarm: {error}", file=sys.stderr)
        return 3
    return 0


def _results_in(directory: Path):
    """(spec, image) of each result PNG in the directory; other PNGs (a grid saved there) are passed over."""
    from PIL import Image

    for path in sorted(directory.glob("*.png")):
        with Image.open(path) as image:
            if SPEC_CHUNK in image.text:
                yield spec_from_json(image.text[SPEC_CHUNK]), image.convert("RGB")


def _grid(args) -> int:
    from renderfarm import grid

    directory = Path(args.job)
    if directory.is_dir():
        sheets = grid.grids(_results_in(directory), args.x, args.y)
    else:
        with _client(args) as client:
            sheets = client.job(args.job).grid(x=args.x, y=args.y)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for number, sheet in enumerate(sheets, 1):
        path = out if len(sheets) == 1 else out.with_name(f"{out.stem}-{number}{out.suffix}")
        sheet.save(path)
        fixed = ", ".join(grid.label(name, value) for name, value in sheet.fixed.items())
        print(f"{path}: {len(sheet.rows)} x {len(sheet.columns)}" + (f" ({fixed})" if fixed else ""), file=sys.stderr)
    return 0


def _keys(args) -> int:
    from renderfarm.cluster import keys

    if args.keys_command == "add":
        token = keys.add_user(
            args.keys_file,
            args.name,
            role=args.role,
            weight=args.weight,
            max_concurrent_jobs=args.max_concurrent_jobs,
            max_images_per_day=args.max_images_per_day,
        )
        print(f"added {args.role} {args.name} to {args.keys_file}; their token (shown this once):", file=sys.stderr)
        print(token)
    elif args.keys_command == "remove":
        keys.remove_user(args.keys_file, args.name)
        print(f"removed {args.name} from {args.keys_file}", file=sys.stderr)
    else:
        for user in keys.load_users(args.keys_file):
            quotas = [f"{name} {value}" for name in ("max_concurrent_jobs", "max_images_per_day")
                      if (value := getattr(user, name)) is not None]  # fmt: skip
            print("  ".join([f"{user.name:<16}", f"{user.role:<6}", f"weight {user.weight:g}", *quotas]))
    return 0


def _print_status(status: JobStatus, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({**dataclasses.asdict(status), "state": status.state.value}))
        return
    line = (
        f"{status.id}  {status.state.value:<9}  {status.completed}/{status.total}  "
        f"owner {status.owner or '-'}  priority {status.priority}"
    )
    print(line + (f"  {status.error}" if status.error else ""))


def _farm_address(args) -> str | None:
    """The farm the command talks to: --address, else $RENDERFARM_ADDRESS; with neither, None for a command
    that then runs a farm of its own (as with --local), the SDK's default for the others."""
    if getattr(args, "local", False):
        return None
    address = args.address or os.environ.get("RENDERFARM_ADDRESS")
    if not address and args.command not in EMBEDDABLE:
        return DEFAULT_ADDRESS
    return address or None


def _run(args) -> int:
    if args.command == "up":
        with _needs_cluster_extra("running a farm"):
            return _serve(_up_config(args))
    if args.command == "serve":
        with _needs_cluster_extra("running a farm"):
            from renderfarm.cluster.config_file import load_config

            return _serve(load_config(args.config))
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "decode":
        return _decode(args)
    if args.command == "upscale":
        return _upscale(args)
    if args.command in ("img2img", "inpaint"):
        return _edit(args)
    if args.command == "keys":
        with _needs_cluster_extra("managing a keys file"):
            return _keys(args)
    if args.command == "grid":
        return _grid(args)
    if args.command == "models":
        with _needs_cluster_extra("resolving a model reference"):
            from renderfarm.actors.models import resolve_model

            print(resolve_model(args.ref, args.model_cache_dir))
        return EXIT_OK
    with _client(args) as client:
        if args.command == "jobs":
            for status in client.jobs(owner=args.owner):
                _print_status(status, args.json)
        elif args.command == "status":
            _print_status(client.job(args.job_id).status(), args.json)
        elif args.command == "cancel":
            _print_status(client.job(args.job_id).cancel(), args.json)
        elif args.command == "delete":
            client.delete(args.job_id)
            print(f"deleted job {args.job_id}", file=sys.stderr)
        elif args.command == "watch":
            job = client.job(args.job_id)
            with contextlib.suppress(JobFailedError):  # the status line below says so
                follow(job, args.out)
            status = job.status()
            _print_status(status, args.json)
            return EXIT_OK if status.state == JobState.SUCCEEDED else EXIT_JOB_FAILED
    return EXIT_OK


def _error_message(error: RenderfarmError, address: str | None) -> str:
    if isinstance(error, FarmUnavailableError) and not isinstance(error, ResultStoreUnreachableError) and address:
        # The reason on a line of its own: refused, no such host, a TLS mismatch, no answer in time.
        reason = str(error).removeprefix(f"cannot reach the farm at {address}: ")
        return f"cannot reach the farm at {address} (is it running? set --address or RENDERFARM_ADDRESS)\nrenderfarm: {reason}"
    if isinstance(error, (AuthenticationError, PermissionDeniedError)) and address:
        return f"the farm at {address} refused the call: {error}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "address"):
        args.address = _farm_address(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("renderfarm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RenderfarmError as error:
        print(f"renderfarm: {_error_message(error, getattr(args, 'address', None))}", file=sys.stderr)
        return next(code for kind, code in ERROR_EXIT_CODES if isinstance(error, kind))
    except (MissingDependencyError, ValueError, OSError) as error:
        print(f"renderfarm: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
