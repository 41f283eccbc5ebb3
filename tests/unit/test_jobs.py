"""The durable job store: what a restarted scheduler finds, and results counted once."""

import asyncio

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
        return [event async for event in store.follow(store.get(job_id), after_seq)]

    return asyncio.run(collect())


def test_a_result_recorded_twice_counts_once(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2)
    assert job.add_result(spec(0), spec(0).file_name)
    assert not job.add_result(spec(0), spec(0).file_name)
    assert job.is_done(spec(0)) and not job.is_done(spec(1))
    assert job.completed == 1
    assert [name for name, _ in job.results()] == [spec(0).file_name]


def test_a_new_store_on_the_same_dir_finds_jobs_results_and_events(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=2)
    job.set_running()
    job.add_result(spec(0), spec(0).file_name)
    job.request_cancel()
    store.close()

    reopened = JobStore(tmp_path)
    (found,) = reopened.unfinished()
    assert (found.id, found.state, found.completed, found.total) == (job.id, JobState.RUNNING, 1, 2)
    assert found.cancel_requested and found.is_done(spec(0))
    assert found.request() == REQUEST and reopened.by_request_id("r-1") is found
    found.add_result(spec(1), spec(1).file_name)
    found.finish(JobState.SUCCEEDED)

    log = events(reopened, job.id)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
    assert [e.result.name for e in log if e.HasField("result")] == [spec(0).file_name, spec(1).file_name]
    assert log[-1].state == pb.JOB_STATE_SUCCEEDED
    assert events(reopened, job.id, after_seq=log[2].seq) == log[3:]


def test_status_summaries_leave_out_the_inputs(tmp_path):
    request = pb.SubmitJobRequest(upscale=pb.UpscaleSpec(model="m", images=[b"x" * 1000]))
    job = JobStore(tmp_path).create(request, total=1)
    assert not job.to_pb().upscale.images and job.request() == request


def test_a_stopping_store_ends_streams_of_unfinished_jobs(tmp_path):
    store = JobStore(tmp_path)
    job = store.create(REQUEST, total=1)
    store.stop_following()
    log = events(store, job.id)
    assert log[-1] is None and log[0].state == pb.JOB_STATE_QUEUED


def test_a_sweep_image_upscaled_in_the_farm_finishes_its_sweep_item(tmp_path):
    from renderfarm.spec import UpscaledImageSpec

    chained = UpscaledImageSpec(model="builtin:tiny-sd-x4-upscaler", source_sha256="ab" * 32, prompt="a fox",
                                negative_prompt="", noise_level=20, steps=2, guidance_scale=9.0, seed=0,
                                width=256, height=256, tile=128, source=spec(0))  # fmt: skip
    job = JobStore(tmp_path).create(REQUEST, total=2)
    job.add_result(chained, chained.file_name)
    assert job.is_done(spec(0)) and not job.is_done(spec(1))
    assert list(job.results()) == [(chained.file_name, chained)]
