"""Results in object storage: a real S3 API (moto's server on loopback) through the real boto3 client.

Workers put each PNG into the bucket; the scheduler records names, sizes and digests only, and clients
fetch the images through presigned URLs.
"""

import io
import json
import os
import subprocess
from collections import Counter

import boto3
import numpy as np
import pytest
from PIL import Image

import renderfarm as rf
from renderfarm.spec import MANIFEST, read_spec, spec_from_json
from tests.integration.processes import RENDERFARM
from tests.servers import strict_s3_server

SMALL = dict(steps=2, width=64, height=64)
BUCKET, PREFIX = "renders", "team-a"


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture
def s3_farm(start_farm, bucket):
    return start_farm(output_dir=None, output=f"s3://{BUCKET}/{PREFIX}")


def objects(s3, job_id: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{job_id}/")
    keys = [entry["Key"] for entry in listing.get("Contents", [])]
    return {key.rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def manifest_specs(text: bytes) -> Counter:
    return Counter(spec_from_json(json.dumps(json.loads(line)["spec"])) for line in text.decode().splitlines())


def rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_sweep_into_s3_never_passes_its_images_through_the_scheduler(s3_farm, farm, bucket, tmp_path):
    sweep = dict(prompts=["a red fox", "a lighthouse"], seeds=range(6), **SMALL)
    with rf.Client(farm.address) as local:
        expected = {result.name: rgb(result.png) for result in local.sweep(**sweep).results()}
    received_before = s3_farm.farm.stats().result_bytes_received
    with rf.Client(s3_farm.address) as client:
        job = client.sweep(**sweep)
        results = list(job.results())
        assert job.status().state == rf.JobState.SUCCEEDED
    # The scheduler handled names and digests only; the local store's farm did receive its PNGs.
    assert s3_farm.farm.stats().result_bytes_received == received_before
    assert farm.farm.stats().result_bytes_received > 0

    assert sorted(result.name for result in results) == sorted(expected)
    for result in results:
        assert result.url.startswith(os.environ["AWS_ENDPOINT_URL"]) and "Signature" in result.url
        assert np.array_equal(rgb(result.png), expected[result.name]), result.name
        assert result.save(tmp_path).read_bytes() == result.png
        assert read_spec(tmp_path / result.name) == result.spec  # the spec chunk rode along

    stored = objects(bucket, job.id)
    assert set(stored) == set(expected) | {MANIFEST}
    assert manifest_specs(stored[MANIFEST]) == Counter(result.spec for result in results)  # each exactly once
    assert all(read_spec(io.BytesIO(stored[result.name])) == result.spec for result in results)


def test_decodes_and_upscales_land_in_s3_too(s3_farm, farm, bucket):
    """The other paths by which workers store PNGs: a tiled decode's assembly, and the upscaler's decode."""
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    jobs = {}
    for name, client_farm in (("local", farm), ("s3", s3_farm)):
        with rf.Client(client_farm.address) as client:
            decoded, upscaled = client.decode(z, tile=64), client.upscale(image, steps=2)
            jobs[name] = [(job.id, list(job.results())) for job in (decoded, upscaled)]
    for (_, local), (job_id, remote) in zip(jobs["local"], jobs["s3"], strict=True):
        ((expected,), (result,)) = local, remote
        assert result.url and np.array_equal(rgb(result.png), rgb(expected.png))
        assert set(objects(bucket, job_id)) == {result.name, MANIFEST}
    assert s3_farm.farm.stats().result_bytes_received == 0


@pytest.fixture(scope="module")
def strict_s3():
    with strict_s3_server() as endpoint:
        yield endpoint


def serve(tmp_path, model_cache_dir, output: str, **env) -> subprocess.CompletedProcess:
    config = tmp_path / "farm.toml"
    config.write_text(
        f'output = "{output}"\nmodel_cache_dir = "{model_cache_dir}"\nstate_dir = "{tmp_path / "state"}"\nport = 0\nmetrics_port = 0\nweb_port = 0\n'
    )
    return subprocess.run(
        [*RENDERFARM, "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": "", **env},
    )  # fmt: skip


def test_a_missing_bucket_or_bad_credentials_stop_the_farm_at_start_naming_the_bucket(
    tmp_path, model_cache_dir, s3_endpoint, strict_s3
):
    missing = serve(tmp_path, model_cache_dir, "s3://no-such-bucket/x")
    assert missing.returncode == 2 and "no-such-bucket" in missing.stderr and "Traceback" not in missing.stderr
    assert "does not exist" in missing.stderr
    refused = serve(tmp_path, model_cache_dir, f"s3://{BUCKET}", AWS_ENDPOINT_URL=strict_s3)
    assert refused.returncode == 2 and BUCKET in refused.stderr and "Traceback" not in refused.stderr
    assert "credentials" in refused.stderr
