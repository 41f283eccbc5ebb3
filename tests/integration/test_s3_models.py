"""A farm rendering a model named "s3://bucket/prefix/": a real S3 API (moto's server on loopback, the
session's s3_endpoint) that the scheduler and every replica reach through the real boto3 client."""

import boto3
import numpy as np
import pytest

import renderfarm as rf
from renderfarm.actors.models import resolve_model

BUCKET = "farm-models"
# Six batches of one on the farm below: more than a replica takes at once (BATCHES_IN_FLIGHT_PER_REPLICA), so
# every denoiser gets some.
SWEEP = dict(prompts="a red fox", seeds=range(6), steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def tiny_sd_in_s3(s3_endpoint, model_cache_dir) -> str:
    """builtin:tiny-sd's files, uploaded under one prefix: the reference that names them."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    source = resolve_model("builtin:tiny-sd", model_cache_dir)
    for path in source.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=BUCKET, Key=f"tiny-sd/{path.relative_to(source).as_posix()}", Body=path.read_bytes()
            )
    return f"s3://{BUCKET}/tiny-sd/"


@pytest.fixture
def s3_farm(start_farm):
    """Replicas enough that one model is loaded by several processes at once."""
    return start_farm(denoisers=2, decoders=2, max_batch=1)


def model_loads(farm) -> dict[tuple[str, int], int]:
    return {
        (stage, index): replica.model_loads
        for stage, stats in farm.farm.stats().stages.items()
        for index, replica in enumerate(stats.replicas)
    }


def test_an_s3_model_renders_as_the_builtin_it_was_uploaded_from_downloaded_once(
    s3_farm, tiny_sd_in_s3, model_cache_dir
):
    with rf.Client(s3_farm.address) as client:
        expected = {result.spec.seed: np.asarray(result.image) for result in client.sweep(**SWEEP).results()}
        loads_before = model_loads(s3_farm)
        results = list(client.sweep(**SWEEP, model=tiny_sd_in_s3).results())

    assert sorted(result.spec.seed for result in results) == sorted(expected)
    for result in results:
        assert result.spec.model == tiny_sd_in_s3
        assert np.array_equal(np.asarray(result.image), expected[result.spec.seed]), result.spec
    loaded = [replica for replica, loads in model_loads(s3_farm).items() if loads > loads_before[replica]]
    # Every stage, both denoisers among them, besides the scheduler, which resolved it to validate the job.
    assert {stage for stage, _ in loaded} == {"encoder", "denoiser", "decoder"}, loaded
    assert {("denoiser", 0), ("denoiser", 1)} <= set(loaded), loaded
    downloads = [path for path in (model_cache_dir / "s3" / BUCKET).glob("*/*") if path.is_dir()]
    assert len(downloads) == 1, downloads


def test_a_missing_bucket_is_refused_on_the_model_field_and_the_farm_serves_on(s3_farm, tiny_sd_in_s3):
    with rf.Client(s3_farm.address) as client:
        with pytest.raises(rf.InvalidJobError) as raised:
            client.sweep(**SWEEP, model="s3://no-such-bucket/tiny-sd/")
        assert raised.value.field == "sweep.model"
        assert "s3://no-such-bucket/tiny-sd/: no bucket named 'no-such-bucket'" in str(raised.value)
        assert "botocore" not in str(raised.value)
        job = client.sweep(**SWEEP, model=tiny_sd_in_s3)
        assert len(list(job.results())) == job.total == 6 and job.status().state == rf.JobState.SUCCEEDED
