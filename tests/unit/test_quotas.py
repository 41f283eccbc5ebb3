"""Admission: the farm's job limit and each user's quotas, and refusals that say when to come back."""

import math
import time
from datetime import datetime, timezone

import pytest

from renderfarm._wire import JobState
from renderfarm.cluster.config import LimitsConfig
from renderfarm.cluster.constants import DAY_S
from renderfarm.cluster.jobs import JobStore
from renderfarm.cluster.keys import User, token_sha256
from renderfarm.cluster.quotas import refusal
from renderfarm.v1 import farm_pb2 as pb

LIMITS = LimitsConfig()


def user(name: str = "alice", **quotas) -> User:
    return User(name, token_sha256(name), **quotas)


def submit(store: JobStore, owner: str, total: int = 1):
    return store.create(pb.SubmitJobRequest(sweep=pb.SweepSpec(model="m", prompts=["a fox"])), total=total, owner=owner)


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path)


def test_the_farms_job_limit_counts_every_users_unfinished_jobs(store):
    limits = LimitsConfig(max_concurrent_jobs=2)
    first = submit(store, "bob")
    submit(store, "alice")
    refused = refusal(limits, user(), store, 1, time.time())
    assert refused.limit == "max_concurrent_jobs"
    assert "2 jobs are queued or running, the farm's limit (max_concurrent_jobs = 2)" in refused.message
    first.change_state(JobState.SUCCEEDED)
    assert refusal(limits, user(), store, 1, time.time()) is None


def test_a_users_job_quota_counts_only_their_own_unfinished_jobs(store):
    alice, bob = user(max_concurrent_jobs=1), user("bob", max_concurrent_jobs=1)
    job = submit(store, "alice")
    refused = refusal(LIMITS, alice, store, 1, time.time())
    assert refused.limit == "max_concurrent_jobs"
    assert "alice has 1 job queued or running, their quota (max_concurrent_jobs = 1)" in refused.message
    assert refusal(LIMITS, bob, store, 1, time.time()) is None
    assert refusal(LIMITS, user("carol"), store, 1, time.time()) is None  # no quota
    job.change_state(JobState.CANCELLED)
    assert refusal(LIMITS, alice, store, 1, time.time()) is None


def test_the_daily_quota_counts_the_images_of_jobs_submitted_in_the_last_24_h(store):
    alice = user(max_images_per_day=10)
    job = submit(store, "alice", total=6)
    submit(store, "bob", total=100)
    # Counted at submission: a finished job's images still count.
    job.change_state(JobState.SUCCEEDED)
    soon = job.created_at + 60
    assert refusal(LIMITS, alice, store, 4, soon) is None
    assert refusal(LIMITS, alice, store, 5, soon).limit == "max_images_per_day"
    assert refusal(LIMITS, alice, store, 10, job.created_at + DAY_S + 1) is None


def test_a_refusal_says_when_enough_of_the_oldest_jobs_leave_the_window(store):
    alice = user(max_images_per_day=10)
    oldest = submit(store, "alice", total=4)
    # The next second, so that the time in the message tells the two oldest jobs apart.
    time.sleep(1 - oldest.created_at % 1)
    second = submit(store, "alice", total=3)
    submit(store, "alice", total=2)
    # 9 used; 6 more fit once the two oldest (7 images) have left, not just the oldest (4).
    now = second.created_at + (5 * 60 + 29.5) * 60
    refused = refusal(LIMITS, alice, store, 6, now)
    frees_at = datetime.fromtimestamp(math.ceil(second.created_at + DAY_S), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert refused.limit == "max_images_per_day"
    assert refused.message == (
        "alice submitted 9 images in the last 24 h; 6 more would pass their quota (max_images_per_day = 10). "
        f"Room for them frees up at {frees_at}, in 18 h 30 min"
    )
    assert refusal(LIMITS, alice, store, 6, second.created_at + DAY_S - 1) is not None
    assert refusal(LIMITS, alice, store, 6, second.created_at + DAY_S + 0.001) is None


def test_a_job_bigger_than_the_whole_daily_quota_says_so(store):
    refused = refusal(LIMITS, user(max_images_per_day=10), store, 11, time.time())
    assert refused.limit == "max_images_per_day"
    assert "a job of 11 images is more than alice's whole quota (max_images_per_day = 10)" in refused.message
