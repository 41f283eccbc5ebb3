"""Exactly once under failure: real processes killed with real signals, real connections cut."""

import io
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
from PIL import Image

import renderfarm as rf
from renderfarm.actors.models import resolve_model
from renderfarm.actors.s3 import parse_s3_url
from renderfarm.cluster.config import RetryConfig
from renderfarm.spec import MANIFEST, read_spec, spec_from_json

pytestmark = pytest.mark.chaos

RENDERFARM = str(Path(sys.executable).parent / "renderfarm")
SMALL = dict(steps=2, width=64, height=64)


def stage_processes(*classes: str) -> set[int]:
    """Pids of the Ray workers running these actor classes (Ray titles them `ray::Class` or `ray::Class.method`)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if entry.name.isdigit() and re.fullmatch(rf"ray::({'|'.join(classes)})(\..*)?", title):
            pids.add(int(entry.name))
    return pids


def stored(farm, job_id: str) -> dict[str, bytes]:
    """The files of a job in its farm's result store (a directory or a bucket), by name."""
    config = farm.farm.config
    if config.output is None:
        return {path.name: path.read_bytes() for path in (config.output_dir / job_id).iterdir()}
    bucket, prefix = parse_s3_url(config.output)
    s3 = boto3.client("s3")
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{job_id}/")
    keys = [entry["Key"] for entry in listing.get("Contents", [])]
    return {key.rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def manifest(files: dict[str, bytes]) -> Counter:
    return Counter(spec_from_json(json.dumps(json.loads(line)["spec"])) for line in files[MANIFEST].decode().splitlines())


def pixels(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(io.BytesIO(png))) for name, png in files.items() if name.endswith(".png")}


@pytest.fixture(scope="module")
def chaos_bucket(s3_endpoint) -> str:
    boto3.client("s3").create_bucket(Bucket="chaos")
    return "s3://chaos/runs"


def source_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# The S3 and img2img runs are shorter: the guarantees are the store's and the kind's to keep, the kills'
# variety is the local run's.
@pytest.mark.parametrize(
    "store, kind, seeds, kills", [("local", "sweep", 80, 8), ("s3", "sweep", 80, 5), ("local", "img2img", 80, 5)]
)
def test_killing_denoisers_and_decoders_changes_no_result(start_farm, request, store, kind, seeds, kills):
    workers = ("DenoiserStage", "DecoderStage")
    others = stage_processes(*workers)
    output = dict(output_dir=None, output=request.getfixturevalue("chaos_bucket")) if store == "s3" else {}
    # Short backoff keeps the test quick; the default attempts stand.
    # A farm of each run's own, so that its replicas are not among `others`, the processes spared.
    farm = start_farm(denoisers=2, decoders=2, max_batch=3 if kind == "sweep" else 4,
                      retries=RetryConfig(backoff_s=0.2, max_backoff_s=2.0), **output)  # fmt: skip
    prompts = ["a red fox", "a lighthouse"]

    def submit(client):
        if kind == "img2img":  # the VAE replicas also encode its source, once per job
            return client.img2img(source_png(), prompts, strength=0.5, seeds=range(seeds), steps=8)
        return client.sweep(prompts, seeds=range(seeds), **SMALL)

    with rf.Client(farm.address) as client:
        clean = submit(client)
        clean.wait()
        chaotic = submit(client)
        killed = []
        while len(killed) < kills:
            time.sleep(random.uniform(0.2, 1.5))
            assert not chaotic.status().state.finished, f"the job ended after only {len(killed)} kills"
            victims = stage_processes(*workers) - others
            if victims:
                victim = random.choice(sorted(victims))
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        status = chaotic.wait()
    assert status.state == rf.JobState.SUCCEEDED and status.completed == status.total == 2 * seeds

    clean_files, chaotic_files = stored(farm, clean.id), stored(farm, chaotic.id)
    expected = {read_spec(io.BytesIO(png)) for name, png in clean_files.items() if name.endswith(".png")}
    assert len(expected) == 2 * seeds
    assert manifest(chaotic_files) == Counter(expected)  # every spec, each exactly once
    clean_pixels, chaotic_pixels = pixels(clean_files), pixels(chaotic_files)
    assert clean_pixels.keys() == chaotic_pixels.keys()
    for name, image in clean_pixels.items():
        assert np.array_equal(chaotic_pixels[name], image), name


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        return listener.getsockname()[1]


def start_scheduler(port: int, state: Path, output: Path, model_cache_dir: Path, log: Path) -> subprocess.Popen:
    """`renderfarm up` joined to the test session's Ray cluster, as a scheduler pod joins its RayCluster."""
    process = subprocess.Popen(
        [RENDERFARM, "up", "--port", str(port), "--metrics-port", "0", "--web-port", "0", "--state-dir", str(state), "--output-dir", str(output),
         "--model-cache-dir", str(model_cache_dir), "--max-batch", "4",
         "--ray-address", ray.get_runtime_context().gcs_address],  # fmt: skip
        stderr=log.open("a"),
    )
    deadline = time.monotonic() + 180
    while "renderfarm serving on" not in log.read_text().split("(restart)")[-1]:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return process


def test_a_scheduler_killed_mid_sweep_resumes_and_streams_each_result_once(ray_session, model_cache_dir, tmp_path):
    port, state, output, log = free_port(), tmp_path / "state", tmp_path / "output", tmp_path / "up.log"
    scheduler = start_scheduler(port, state, output, model_cache_dir, log)
    seen, errors = [], []
    try:
        with rf.Client(f"127.0.0.1:{port}") as client:
            job = client.sweep(["a red fox", "a lighthouse"], seeds=range(40), **SMALL)

            def follow() -> None:
                try:
                    seen.extend(result.name for result in job.results())
                except Exception as error:  # surfaced by the assertions below
                    errors.append(error)

            follower = threading.Thread(target=follow)
            follower.start()
            while len(seen) < 10:
                assert follower.is_alive(), errors
                time.sleep(0.05)
            scheduler.send_signal(signal.SIGKILL)
            scheduler.wait()
            assert job.total > len(seen), "the sweep ended before the scheduler was killed"
            with log.open("a") as marker:
                marker.write("(restart)\n")
            scheduler = start_scheduler(port, state, output, model_cache_dir, log)
            follower.join(timeout=300)
            status = job.status()
    finally:
        scheduler.kill()
        scheduler.wait()

    assert not errors and status.state == rf.JobState.SUCCEEDED and status.completed == 80
    assert len(seen) == len(set(seen)) == 80  # each result once, across the crash
    files = sorted(path.name for path in (output / job.id).glob("*.png"))
    assert sorted(seen) == files
    manifest_files = {MANIFEST: (output / job.id / MANIFEST).read_bytes()}
    assert sorted(spec.file_name for spec in manifest(manifest_files).elements()) == files


class DroppableProxy:
    """A TCP proxy on loopback whose connections the test cuts, as a flaky network would."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self.accepted += 1
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def drop_connections(self) -> None:
        for end in self._sockets:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.drop_connections()
        self._listener.close()


def test_a_dropped_connection_resumes_without_loss_or_duplicate(start_farm):
    farm = start_farm(max_batch=1)
    proxy = DroppableProxy(farm.address)
    try:
        with rf.Client(proxy.address) as client:
            job = client.sweep("a red fox", seeds=range(30), **SMALL)
            names = []
            for result in job.results():
                names.append(result.name)
                if len(names) in (3, 12):
                    proxy.drop_connections()
    finally:
        proxy.close()
    assert proxy.accepted >= 3  # the stream really went down twice, and came back
    assert len(names) == len(set(names)) == 30


def test_a_poison_item_fails_its_job_with_the_error_and_the_farm_serves_on(start_farm, model_cache_dir, tmp_path):
    # A model whose configs are fine, so the job is accepted, but whose UNet weights are not.
    broken = tmp_path / "broken-model"
    shutil.copytree(resolve_model("builtin:tiny-sd", model_cache_dir), broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    farm = start_farm(retries=RetryConfig(max_attempts=2, backoff_s=0.1))
    with rf.Client(farm.address) as client:
        job = client.sweep("a red fox", model=str(broken), **SMALL)
        with pytest.raises(rf.JobFailedError, match="failed 2 times"):
            job.wait()
        assert job.status().state == rf.JobState.FAILED
        assert client.sweep("a red fox", **SMALL).wait().completed == 1
