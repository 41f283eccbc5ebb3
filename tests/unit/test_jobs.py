"""The durable job store: what a restarted scheduler finds, and results counted once."""

import asyncio

import pytest

from renderfarm._wire import JobState
from renderfarm.cluster.jobs import JobStore
from renderfarm.spec import ImageSpec
from renderfarm.v1 import farm_pb2 as pb

REQUEST = pb.SubmitJobRequest(request_id="r-1", sweep=pb.SweepSpec(model="builtin:tiny-sd", prompts=["a fox"]))


def spec(seed: int) -> ImageSpec:
    return ImageSpec(model="builtin:tiny-sd", prompt="a fox", negative_prompt="", seed=seed, width=64, height=64,
                     steps=2, guidance_scale=7.5, scheduler="pndm")  # fmt: skip


def events(store: JobStore, job_id: str, after_seq: int = 0) -> list[pb.JobEvent]:
    async def collect():
        found = []
        async for run in store.follow(store.get(job_id), after_seq):
            found.extend([None] if run is None else run)
        return found

    return asyncio.run(collect())


def record(store: JobStore, job, *specs) -> list:
    return store.add_results([(job, s, s.file_name, None) for s in specs])


def test_a_result_recorded_twice_counts_once(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2, owner="alice")
    assert len(record(store, job, spec(0))) == 1
    assert record(store, job, spec(0)) == []
    assert job.is_done(spec(0)) and not job.is_done(spec(1))
    assert job.completed == 1
    assert [name for name, _ in job.results()] == [spec(0).file_name]


def test_results_of_many_jobs_are_committed_together_with_one_progress_event_per_job(tmp_path):
    store = JobStore(tmp_path)
    first, second = (
        store.create(REQUEST, total=3, owner="alice"),
        store.create(pb.SubmitJobRequest(sweep=REQUEST.sweep), total=1, owner="alice"),
    )
    new = store.add_results([(first, spec(0), spec(0).file_name, None), (second, spec(0), spec(0).file_name, None),
                             (first, spec(1), spec(1).file_name, None), (first, spec(1), spec(1).file_name, None)])  # fmt: skip
    assert [(job.id, s) for job, s, _, _ in new] == [(first.id, spec(0)), (second.id, spec(0)), (first.id, spec(1))]
    store.stop_following()
    kinds = [e.WhichOneof("kind") for e in events(store, first.id)[:-1]]  # the last: None, for a stopping store
    assert kinds == ["state", "result", "result", "progress"]
    assert (first.completed, second.completed) == (2, 1)


def test_a_job_changes_state_through_one_door_and_a_finished_state_is_final(tmp_path):
    job = JobStore(tmp_path).create(REQUEST, total=1, owner="alice")
    assert job.state == JobState.QUEUED
    job.change_state(JobState.RUNNING)
    with pytest.raises(ValueError, match="cannot go from running to queued"):
        job.change_state(JobState.QUEUED)
    job.change_state(JobState.FAILED, "poison")
    for state in JobState:
        with pytest.raises(ValueError, match="cannot go from failed"):
            job.change_state(state)
    assert (job.state, job.error) == (JobState.FAILED, "poison")


def test_failed_attempts_survive_a_restart(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2, owner="alice")
    assert [job.count_failure(spec(0)) for _ in range(3)] == [1, 2, 3]
    store.close()
    found = JobStore(tmp_path).get(job.id)
    assert (found.failures(spec(0)), found.failures(spec(1))) == (3, 0)
    assert found.count_failure(spec(0)) == 4


def test_a_new_store_on_the_same_dir_finds_jobs_results_and_events(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2, owner="alice")
    job.change_state(JobState.RUNNING)
    record(store, job, spec(0))
    job.request_cancel()
    store.close()

    reopened = JobStore(tmp_path)
    (found,) = reopened.unfinished()
    assert (found.id, found.state, found.completed, found.total) == (job.id, JobState.RUNNING, 1, 2)
    assert found.cancel_requested and found.is_done(spec(0))
    assert found.request() == REQUEST and reopened.by_request_id("alice", "r-1") is found
    record(reopened, found, spec(1))
    found.change_state(JobState.SUCCEEDED)

    log = events(reopened, job.id)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert [e.result.name for e in log if e.HasField("result")] == [spec(0).file_name, spec(1).file_name]
    assert log[-1].state == pb.JOB_STATE_SUCCEEDED
    assert events(reopened, job.id, after_seq=log[2].seq) == log[3:]


def test_status_summaries_leave_out_the_inputs(tmp_path):
    request = pb.SubmitJobRequest(upscale=pb.UpscaleSpec(model="m", images=[b"x" * 1000]))
    job = JobStore(tmp_path).create(request, total=1, owner="alice")
    assert not job.to_pb().upscale.images and job.request() == request


def test_a_stopping_store_ends_streams_of_unfinished_jobs(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=1, owner="alice")
    store.stop_following()
    log = events(store, job.id)
    assert log[-1] is None and log[0].state == pb.JOB_STATE_QUEUED


def test_a_sweep_image_upscaled_in_the_farm_finishes_its_sweep_item(tmp_path):
    from renderfarm.spec import UpscaledImageSpec

    chained = UpscaledImageSpec(model="builtin:tiny-sd-x4-upscaler", source_sha256="ab" * 32, prompt="a fox",
                                negative_prompt="", noise_level=20, steps=2, guidance_scale=9.0, seed=0,
                                width=256, height=256, tile=128, source=spec(0))  # fmt: skip
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2, owner="alice")
    record(store, job, chained)
    assert job.is_done(spec(0)) and not job.is_done(spec(1))
    assert list(job.results()) == [(chained.file_name, chained)]


class Unrecordable(ImageSpec):
    def to_json(self) -> str:
        raise RuntimeError("disk full")


def test_a_failed_commit_records_nothing_and_the_same_results_record_later(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=3, owner="alice")
    broken = Unrecordable(**vars(spec(2)))
    with pytest.raises(RuntimeError, match="disk full"):
        store.add_results([(job, spec(0), spec(0).file_name, None), (job, broken, "broken.png", None)])
    assert job.completed == 0 and not job.is_done(spec(0))
    reopened = JobStore(tmp_path).get(job.id)
    # Nothing durable: a result, its events and its count commit together or not at all.
    assert (reopened.completed, list(reopened.results()), len(reopened.events_after(0))) == (0, [], 1)
    assert len(record(store, job, spec(0), spec(1))) == 2
    store.stop_following()
    log = events(store, job.id)[:-1]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert [e.result.name for e in log if e.HasField("result")] == [spec(0).file_name, spec(1).file_name]


def test_request_ids_are_each_owners_own(tmp_path):
    import sqlite3

    store = JobStore(tmp_path)
    alice, bob = store.create(REQUEST, total=1, owner="alice"), store.create(REQUEST, total=1, owner="bob")
    assert alice.id != bob.id
    assert (store.by_request_id("alice", "r-1"), store.by_request_id("bob", "r-1")) == (alice, bob)
    assert store.by_request_id("carol", "r-1") is None
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        store.create(REQUEST, total=1, owner="alice")
    assert JobStore(tmp_path).by_request_id("bob", "r-1").id == bob.id


# The jobs table as written before jobs had owners: request ids were the farm's, not each user's.
OLD_JOBS_TABLE = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    request BLOB NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    cancel_requested INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE TABLE results (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE attempts (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    item TEXT NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (job_id, item)
);
CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    seq INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


def test_a_store_from_before_owners_keeps_its_jobs_owned_by_no_one(tmp_path):
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.sqlite3")
    old.executescript(OLD_JOBS_TABLE)
    result = pb.ImageResult(spec=pb.ImageSpec(**vars(spec(0))), name=spec(0).file_name)
    with old:
        old.execute("INSERT INTO jobs VALUES ('old', 'r-1', ?, 'running', 2, 1, '', 1700000000.0, 0, 2)",
                    (REQUEST.SerializeToString(),))  # fmt: skip
        old.execute("INSERT INTO results VALUES ('old', ?, ?, ?)", (result.name, spec(0).to_json(), result.name))
        for seq, kind in ((1, {"state": pb.JOB_STATE_QUEUED}), (2, {"result": result})):
            event = pb.JobEvent(seq=seq, job_id="old", **kind).SerializeToString()
            old.execute("INSERT INTO events VALUES ('old', ?, ?)", (seq, event))
    old.close()

    store = JobStore(tmp_path)
    job = store.get("old")
    assert (job.owner, job.state, job.completed, job.request()) == ("", JobState.RUNNING, 1, REQUEST)
    assert store.by_request_id("", "r-1") is job and list(job.results()) == [(spec(0).file_name, spec(0))]
    # The same request id is another owner's own; the old job goes on where it was.
    new = store.create(REQUEST, total=1, owner="alice")
    record(store, job, spec(1))
    job.change_state(JobState.SUCCEEDED)
    log = events(store, "old")
    assert [e.seq for e in log] == [1, 2, 3, 4, 5] and log[1].result == result
    store.close()

    reopened = JobStore(tmp_path)
    assert [(j.id, j.owner) for j in reopened.all()] == [("old", ""), (new.id, "alice")]
    assert [name for name, _ in reopened.get("old").results()] == [spec(0).file_name, spec(1).file_name]


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_a_damaged_job_store_is_named_in_one_error_and_kept_as_it_was(tmp_path, damage):
    from renderfarm.cluster.jobs import DATABASE

    store = JobStore(tmp_path)
    for _ in range(40):
        store.create(pb.SubmitJobRequest(sweep=pb.SweepSpec(model="m", prompts=["x" * 2000])), 1, owner="alice")
    store.close()
    path = tmp_path / DATABASE
    data = path.read_bytes()
    damaged = b"not a database at all" * 100 if damage == "garbled" else data[: len(data) // 3]
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match=f"the job store {path} cannot be read"):
        JobStore(tmp_path)
    assert path.read_bytes() == damaged


def test_up_on_a_damaged_job_store_says_which_file_in_one_line_and_exits_2(tmp_path, capsys):
    from renderfarm.cli import main
    from renderfarm.cluster.jobs import DATABASE

    (tmp_path / DATABASE).write_bytes(b"garbage" * 500)
    assert main(["up", "--port", "0", "--state-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"renderfarm: the job store {tmp_path / DATABASE} cannot be read")
    assert (tmp_path / DATABASE).read_bytes() == b"garbage" * 500
