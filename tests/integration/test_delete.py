"""Deleting jobs and retention: results leave the result store (a directory or a bucket), rows the job store."""

import time
from dataclasses import replace

import boto3
import pytest

import renderfarm as rf
from renderfarm.cluster.embedded import EmbeddedFarm

SMALL = dict(steps=2, width=64, height=64)


def bucket_keys(s3, prefix: str) -> set[str]:
    return {entry["Key"] for entry in s3.list_objects_v2(Bucket="kept", Prefix=prefix).get("Contents", [])}


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="kept")
    return s3


def test_deleting_a_job_removes_its_files_and_rows_and_nothing_else(farm):
    output = farm.farm.config.output_dir
    with rf.Client(farm.address) as client:
        gone, kept = client.sweep("a red fox", seeds=range(2), **SMALL), client.sweep("a lighthouse", **SMALL)
        gone.wait(), kept.wait()
        running = client.sweep("a red fox", seeds=range(200), **SMALL)
        with pytest.raises(rf.RenderfarmError, match="cancel it first"):
            running.delete()
        assert (output / gone.id).is_dir()
        gone.delete()
        with pytest.raises(rf.JobNotFoundError):
            gone.status()
        with pytest.raises(rf.JobNotFoundError):
            gone.delete()
        assert not (output / gone.id).exists() and len(list((output / kept.id).glob("*.png"))) == 1
        assert gone.id not in {status.id for status in client.jobs()}
        running.cancel()
        running.wait()
        running.delete()


def test_deleting_an_s3_job_removes_its_objects(start_farm, bucket):
    farm = start_farm(output_dir=None, output="s3://kept/deleting")
    with rf.Client(farm.address) as client:
        gone, kept = client.sweep("a red fox", seeds=range(3), **SMALL), client.sweep("a lighthouse", **SMALL)
        gone.wait(), kept.wait()
        assert len(bucket_keys(bucket, f"deleting/{gone.id}/")) == 4  # 3 PNGs and the manifest
        client.delete(gone.id)
    assert bucket_keys(bucket, f"deleting/{gone.id}/") == set()
    assert len(bucket_keys(bucket, f"deleting/{kept.id}/")) == 2


def test_retention_deletes_only_finished_jobs_older_than_it(farm_config, ray_session, tmp_path):
    config = replace(farm_config, state_dir=tmp_path / "state", output_dir=tmp_path / "output")
    with EmbeddedFarm(config) as farm, rf.Client(farm.address) as client:
        old = client.sweep("a red fox", **SMALL)
        old.wait()
        # Left unfinished by the farm's stop, however old it is by the next start.
        unfinished = client.sweep("a lighthouse", seeds=range(400), **SMALL)
    time.sleep(2)
    two_seconds = 2 / 86400
    with EmbeddedFarm(replace(config, retention_days=two_seconds)) as farm, rf.Client(farm.address) as client:
        # The check at start has run: the job that ended before the stop is older than two seconds.
        assert {status.id for status in client.jobs()} == {unfinished.id}
        assert not (config.output_dir / old.id).exists()
        client.job(unfinished.id).cancel()
        new = client.sweep("a red fox", seeds=1, **SMALL)
        assert new.wait().state == rf.JobState.SUCCEEDED
        assert {status.id for status in client.jobs()} == {unfinished.id, new.id}
