"""Models named "s3://bucket/prefix/": a real S3 API (moto's server on loopback) through the real boto3 client.

GetObject calls are counted with boto3's public event hooks on the client that the resolver uses (one per
process, actors.s3.client): the requests themselves go to the server unchanged.
"""

import contextlib
import hashlib
import multiprocessing
import re
from pathlib import Path

import boto3
import pytest

from renderfarm.actors import models, s3
from renderfarm.actors.models import ModelNotFoundError
from renderfarm.cluster import validate
from renderfarm.cluster.model_info import model_info
from renderfarm.errors import InvalidJobError
from tests.servers import strict_s3_server

BUCKET = "models"
GET_OBJECT = "before-call.s3.GetObject"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                            ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
            env.setenv(name, value)
        # The resolver's client is made once per process: one made before (or after) would miss this server.
        s3.client.cache_clear()
        yield endpoint
    s3.client.cache_clear()
    server.stop()


@pytest.fixture(scope="module")
def null_sd_dir(model_cache_dir) -> Path:
    """The smallest diffusers pipeline, built once in the run's shared model cache."""
    return models.resolve_model("builtin:null-sd", model_cache_dir)


@pytest.fixture(scope="module")
def bucket(s3_endpoint, null_sd_dir):
    """A bucket holding null-sd under "null-sd/", with the empty "folder" object an S3 console adds."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    upload(client, "null-sd", null_sd_dir)
    client.put_object(Bucket=BUCKET, Key="null-sd/unet/", Body=b"")
    return client


def upload(client, prefix: str, directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(directory).as_posix()}", Body=path.read_bytes()
            )


def file_digests(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def versions(model_dir: Path) -> list[str]:
    """The version directories downloaded for the model's reference (its siblings, lock file aside)."""
    return sorted(path.name for path in model_dir.parent.iterdir() if path.is_dir())


@contextlib.contextmanager
def gets_counted():
    """The GetObject calls made in this block by this process's S3 client."""
    calls = []

    def count(**_):
        calls.append(1)

    events = s3.client().meta.events
    events.register(GET_OBJECT, count)
    try:
        yield calls
    finally:
        events.unregister(GET_OBJECT, count)


def test_resolves_to_a_download_in_the_cache_equal_file_for_file(bucket, null_sd_dir, tmp_path):
    model_dir = models.resolve_model(f"s3://{BUCKET}/null-sd/", tmp_path)
    assert model_dir.is_relative_to(tmp_path / "s3" / BUCKET)
    assert file_digests(model_dir) == file_digests(null_sd_dir)
    assert models.default_image_size(model_dir) == models.default_image_size(null_sd_dir)


def test_a_second_resolve_downloads_nothing_and_touches_no_file(bucket, tmp_path):
    ref = f"s3://{BUCKET}/null-sd/"
    model_dir = models.resolve_model(ref, tmp_path)
    stamps = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in model_dir.rglob("*")}
    with gets_counted() as gets:
        # The same prefix, however it is spelled, is the same model.
        assert models.resolve_model(ref, tmp_path) == models.resolve_model(f"s3://{BUCKET}/null-sd", tmp_path)
    assert gets == []
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in model_dir.rglob("*")} == stamps


def test_a_changed_object_gives_a_new_directory_and_leaves_the_old_one_whole(bucket, null_sd_dir, tmp_path):
    upload(bucket, "changing", null_sd_dir)
    ref = f"s3://{BUCKET}/changing/"
    before = models.resolve_model(ref, tmp_path)
    changed = "scheduler/scheduler_config.json"
    new_bytes = (null_sd_dir / changed).read_bytes() + b"\n"
    bucket.put_object(Bucket=BUCKET, Key=f"changing/{changed}", Body=new_bytes)

    after = models.resolve_model(ref, tmp_path)
    assert after != before and versions(after) == sorted([before.name, after.name])
    assert (after / changed).read_bytes() == new_bytes
    expected = file_digests(null_sd_dir)
    assert file_digests(before) == expected  # a replica still loading the old version finds it intact
    assert file_digests(after) == {**expected, changed: hashlib.sha256(new_bytes).hexdigest()}


@pytest.fixture(scope="module")
def hostile(bucket):
    """Prefixes whose keys would write outside the model's directory."""
    for prefix, key in (("dotdot", "dotdot/../escape"), ("absolute", "absolute//tmp/escape")):
        bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/model_index.json", Body=b"{}")
        bucket.put_object(Bucket=BUCKET, Key=key, Body=b"pwned")
    bucket.put_object(Bucket=BUCKET, Key="not-a-model/unet/config.json", Body=b"{}")


REFUSED = [
    ("s3://no-such-bucket/null-sd/", "no bucket named 'no-such-bucket'"),
    (f"s3://{BUCKET}/nothing-here/", f"no model_index.json under prefix 'nothing-here/' of bucket '{BUCKET}'"),
    (f"s3://{BUCKET}/not-a-model/", f"no model_index.json under prefix 'not-a-model/' of bucket '{BUCKET}'"),
    (f"s3://{BUCKET}/dotdot/", f"key 'dotdot/../escape' of bucket '{BUCKET}' leads out of the model's directory"),
    (f"s3://{BUCKET}/absolute/", f"key 'absolute//tmp/escape' of bucket '{BUCKET}' leads out of the model's directory"),
    ("s3://Old_Bucket/null-sd/", "'Old_Bucket' is not an S3 bucket name"),
    ("s3:///null-sd/", "names no bucket"),
]


@pytest.mark.parametrize("ref, message", REFUSED)
def test_a_bad_reference_is_refused_by_name_and_leaves_nothing_in_the_cache(hostile, tmp_path, ref, message):
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match=re.escape(message)) as raised:
        models.resolve_model(ref, cache)
    assert ref in str(raised.value)
    assert not cache.exists() or not any(cache.rglob("*"))


def test_validation_reports_a_missing_bucket_on_the_model_field(bucket, tmp_path):
    ref = "s3://no-such-bucket/sd/"
    with pytest.raises(InvalidJobError) as raised:
        validate.model("sweep.model", ref, lambda model: model_info(model, tmp_path))
    assert raised.value.field == "sweep.model"
    assert str(raised.value) == f"sweep.model: {ref}: no bucket named 'no-such-bucket'"


@pytest.fixture
def strict_s3_endpoint(monkeypatch):
    """The resolver's client pointed, for the test, at an S3 API that refuses every credential."""
    with strict_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        s3.client.cache_clear()
        yield
        s3.client.cache_clear()  # before monkeypatch restores the module's endpoint


def test_credentials_the_store_refuses_are_reported_with_the_bucket(s3_endpoint, strict_s3_endpoint, tmp_path):
    with pytest.raises(ModelNotFoundError) as raised:
        models.resolve_model(f"s3://{BUCKET}/null-sd/", tmp_path)
    assert str(raised.value) == (
        f"s3://{BUCKET}/null-sd/: the farm's S3 credentials may not read bucket '{BUCKET}' (InvalidAccessKeyId)"
    )


def resolve_when_all_start(ref: str, cache_dir: Path, start, results) -> None:
    """One replica starting: resolves `ref` together with the others, reporting its path and its GETs."""
    with gets_counted() as gets:  # makes the client before the start, so the resolves themselves race
        start.wait()
        model_dir = models.resolve_model(ref, cache_dir)
    results.put((model_dir, len(gets)))


def test_processes_resolving_at_once_download_the_model_once(bucket, null_sd_dir, tmp_path):
    replicas = 4
    spawn = multiprocessing.get_context("spawn")  # fresh processes, each with its own client, as replicas have
    start, results = spawn.Barrier(replicas), spawn.Queue()
    processes = [
        spawn.Process(target=resolve_when_all_start, args=(f"s3://{BUCKET}/null-sd/", tmp_path, start, results))
        for _ in range(replicas)
    ]
    for process in processes:
        process.start()
    resolved = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    model_dirs = {model_dir for model_dir, _ in resolved}
    assert len(model_dirs) == 1
    (model_dir,) = model_dirs
    assert versions(model_dir) == [model_dir.name]
    assert sum(gets for _, gets in resolved) == len(file_digests(null_sd_dir))  # each file fetched once in all
    assert file_digests(model_dir) == file_digests(null_sd_dir)
