"""The scheduler's bookkeeping throughput: many images of a model that costs next to nothing.

On the null model (builtin:null-sd: SD 1.x's architecture at its smallest, random weights),
8x8 images, 1 step, guidance 1.0 (unguided), the model's time is negligible, so what is measured
is the farm's own work per image: planning, batching, dispatch, storing each PNG and its result
record, streaming it to the client. Two runs, one process:

- renderfarm: a real `renderfarm up` subprocess (one replica per stage), driven by the SDK:
  `rf.Client(addr).sweep(prompt, seeds=range(N), model="builtin:null-sd")`, timed from submission
  to the last result of `job.results()`, after a short warm-up job that loads the models;
- diffusers: a plain StableDiffusionPipeline loop on the same model in this process, one image per
  call with a seeded CPU generator, each encoded to PNG as the farm does, on one torch thread
  (what each farm replica runs on).

    python bench/scheduler_throughput.py [--images 2000] [--baseline-images 200] [--max-batch 64] [--keep]

Prints images/s of each, the ratio farm/diffusers, and the peak RSS (VmHWM) of the scheduler
process (`renderfarm up`).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import renderfarm as rf
from renderfarm.actors.models import resolve_model, silence_progress_bars
from renderfarm.spec import ImageSpec, encode_png

PROMPT = "a red fox"
MODEL = "builtin:null-sd"
# Its native size: a one-level VAE makes latents the image's own size.
NATIVE_SIZE = 8
SERVING_LINE = "renderfarm serving on"
MIB = 2**20


def diffusers_loop(model_dir: Path, images: int, steps: int, size: int) -> tuple[float, bytes]:
    """Images/s of the loop a diffusers user writes (a pipeline call per image, each to PNG), and seed 0's PNG."""
    from diffusers import StableDiffusionPipeline

    threads = torch.get_num_threads()
    # Ray runs each farm replica on one intra-op thread (OMP_NUM_THREADS=1): match it.
    torch.set_num_threads(1)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)

        def render(seed: int) -> bytes:
            generator = torch.Generator("cpu").manual_seed(seed)
            image = pipe(
                PROMPT, num_inference_steps=steps, width=size, height=size, guidance_scale=1.0, generator=generator
            ).images[0]
            spec = ImageSpec(
                model=MODEL, prompt=PROMPT, negative_prompt="", seed=seed, width=size, height=size,
                steps=steps, guidance_scale=1.0, scheduler="ddim",
            )  # fmt: skip
            return encode_png(image, spec)

        render(images)  # warm-up, outside the timing
        started = time.perf_counter()
        pngs = [render(seed) for seed in range(images)]
        return images / (time.perf_counter() - started), pngs[0]
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def renderfarm_command() -> list[str]:
    """The `renderfarm` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("renderfarm")
    if script.exists():
        return [str(script)]
    found = shutil.which("renderfarm")
    if found is None:
        sys.exit("no `renderfarm` command next to this Python or on PATH: pip install -e '.[cluster]'")
    return [found]


class Up:
    """A `renderfarm up` subprocess; its stderr goes to a log file, watched for the serving line."""

    def __init__(self, scratch: Path, max_batch: int, startup_timeout: float):
        self.port = free_port()
        self.log_path = scratch / "up.log"
        command = renderfarm_command() + [
            "up", "--port", str(self.port), "--max-batch", str(max_batch),
            "--encoders", "1", "--denoisers", "1", "--decoders", "1", "--upscalers", "1",
            "--state-dir", str(scratch / "state"), "--output-dir", str(scratch / "output"),
            "--model-cache-dir", str(scratch / "models"),
        ]  # fmt: skip
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True
        )
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + startup_timeout
        while not self._serving.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with {self.process.returncode}" if self.process.returncode is not None else "timed out"
                sys.exit(f"`renderfarm up` {why} before serving; its log:\n{self.log_tail()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._log.write(line)
            self._log.flush()
            if SERVING_LINE in line:
                self._serving.set()

    def peak_rss_bytes(self) -> int | None:
        """VmHWM of the scheduler process: its peak resident memory so far."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        return None

    def stop(self, timeout: float = 60) -> int | None:
        """SIGINT (a graceful drain), then SIGTERM, then SIGKILL, waiting for each; its exit code."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            if signum == signal.SIGKILL:
                # Its own session (start_new_session): the group holds its Ray processes too.
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"`renderfarm up` still running {timeout:.0f} s after {signum.name}", file=sys.stderr)
        self._reader.join(5)
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def farm_sweep(up: Up, model: str, images: int, steps: int, size: int, timeout: float) -> tuple[float, int, bytes]:
    """farm_sweep_unguarded's answer; FarmStuck (with the farm's log) when it gives none within `timeout` s."""
    answer: list = []
    worker = threading.Thread(
        target=lambda: answer.append(_attempt(farm_sweep_unguarded, up, model, images, steps, size)), daemon=True
    )
    worker.start()
    worker.join(timeout)
    if not answer:
        raise FarmStuck(f"no answer from the farm within {timeout:.0f} s; the end of its log:\n{up.log_tail()}")
    ok, value = answer[0]
    if not ok:
        raise value
    return value


class FarmStuck(RuntimeError):
    """The farm's jobs did not finish in time (a farm mid-change can hang rather than fail)."""


def _attempt(function, *args):
    try:
        return True, function(*args)
    except BaseException as error:  # handed to the waiting thread, which raises it
        return False, error


def farm_sweep_unguarded(up: Up, model: str, images: int, steps: int, size: int) -> tuple[float, int, bytes]:
    """Images/s through the farm from submission to the last result, the PNG bytes received, seed 0's PNG."""
    settings = dict(steps=steps, width=size, height=size, guidance_scale=1.0, model=model)
    with rf.Client(up.address) as client:
        # Load the models on every replica outside the timed run, as on a farm already serving.
        client.sweep(PROMPT, seeds=range(images, images + 4), **settings).wait()
        started = time.perf_counter()
        job = client.sweep(PROMPT, seeds=range(images), **settings)
        count = received = 0
        first = b""
        for result in job.results():
            count += 1
            received += len(result.png)
            if result.spec.seed == 0:
                first = result.png
        seconds = time.perf_counter() - started
    if count != images:
        sys.exit(f"the farm returned {count} results for {images} images")
    return images / seconds, received, first


def same_pixels(png: bytes, other: bytes) -> bool:
    from PIL import Image

    def pixels(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB").tobytes()

    return bool(png) and bool(other) and pixels(png) == pixels(other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images of the farm's sweep (1 prompt x N seeds)")
    parser.add_argument("--baseline-images", type=int, default=200, help="images of the diffusers loop")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=NATIVE_SIZE, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--startup-timeout", type=float, default=300, help="seconds `renderfarm up` may take to serve")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the farm's two jobs may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir (model, results, job store, up.log)")
    args = parser.parse_args()

    # SIGTERM unwinds like Ctrl-C, so the finally blocks below stop `renderfarm up` and its Ray.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    silence_progress_bars()
    stuck = None
    scratch = Path(tempfile.mkdtemp(prefix="renderfarm-throughput-"))
    try:
        model_dir = resolve_model(MODEL, scratch / "models")
        baseline, baseline_png = diffusers_loop(model_dir, args.baseline_images, args.steps, args.size)

        up = Up(scratch, args.max_batch, args.startup_timeout)
        try:
            farm, received, farm_png = farm_sweep(up, MODEL, args.images, args.steps, args.size, args.timeout)
            peak = up.peak_rss_bytes()
        except FarmStuck as error:
            stuck = error
        finally:
            code = up.stop()
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    if stuck is not None:
        print(stuck, file=sys.stderr)
        # The client thread still waits on the farm's stream; leave it behind.
        sys.stderr.flush()
        os._exit(1)
    peak_text = f"{peak / MIB:.0f} MiB" if peak is not None else "unavailable (no /proc)"
    print(f"scheduler throughput: null model, {args.size}x{args.size}, {args.steps} step(s), guidance 1.0, "
          f"max batch {args.max_batch}, one replica per stage, torch threads 1, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"diffusers loop : {baseline:8.1f} images/s  ({args.baseline_images} images, PNG bytes each)")
    print(f"renderfarm     : {farm:8.1f} images/s  ({args.images} images via `renderfarm up` + SDK, "
          f"{received / args.images:.0f} PNG bytes/image)")  # fmt: skip
    print(f"ratio farm/diffusers: {farm / baseline:.2f}x")
    print(f"seed 0 pixel-identical to diffusers': {same_pixels(farm_png, baseline_png)}")
    print(f"scheduler peak RSS (VmHWM of `renderfarm up`): {peak_text}")
    if code not in (0, None):
        print(f"note: `renderfarm up` exited with {code} on SIGINT", file=sys.stderr)


if __name__ == "__main__":
    main()
