"""Graceful shutdown: health goes NOT_SERVING, new jobs are refused, in-flight items drain into the store,
and the next scheduler on the state dir finishes the job."""

import threading
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health_pb2_grpc import HealthStub

from renderfarm._constants import CHANNEL_OPTIONS
from renderfarm.cluster.embedded import EmbeddedFarm
from renderfarm.cluster.rpc import SERVICE_NAME
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def sweep(seeds: int) -> pb.SubmitJobRequest:
    return pb.SubmitJobRequest(sweep=pb.SweepSpec(
        model="builtin:tiny-sd", prompts=["a lighthouse"], seeds=range(seeds), steps=[30],
        sizes=[pb.Size(width=64, height=64)],
    ))  # fmt: skip


def test_stopping_reports_not_serving_while_in_flight_items_drain(ray_session, farm_config, tmp_path):
    # A farm of its own, since this test stops it; small batches keep items in flight while it drains.
    config = replace(farm_config, output_dir=tmp_path, state_dir=tmp_path / "state", max_batch=2)
    farm = EmbeddedFarm(config).__enter__()
    stopper = threading.Thread(target=farm.__exit__, args=(None, None, None))
    try:
        with grpc.insecure_channel(farm.address, options=CHANNEL_OPTIONS) as channel:
            stub, health = RenderFarmStub(channel), HealthStub(channel)
            job = stub.SubmitJob(sweep(seeds=40)).job
            events = stub.StreamJobEvents(pb.StreamJobEventsRequest(job_id=job.id, omit_images=True))
            seen = [next(e for e in events if e.WhichOneof("kind") == "result")]
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert next(watch).status == SERVING

            stopper.start()
            assert next(watch).status == NOT_SERVING
            watch.cancel()
            # Health went NOT_SERVING while the job's in-flight items were still running ...
            assert stub.GetJob(pb.GetJobRequest(job_id=job.id)).job.state == pb.JOB_STATE_RUNNING
            # ... and the draining farm takes no new job.
            with pytest.raises(grpc.RpcError) as raised:
                stub.SubmitJob(sweep(seeds=1))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in raised.value.details()
            # The stream ends UNAVAILABLE, for the client to resume from the next scheduler.
            with pytest.raises(grpc.RpcError) as ended:
                for event in events:
                    seen.append(event)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if stopper.ident is None:  # failed before stopping it
            stopper.start()
        stopper.join(120)

    names = [e.result.name for e in seen if e.WhichOneof("kind") == "result"]
    # The items in flight when it stopped finished and were stored; the rest were never dispatched.
    assert 1 < len(names) < 40
    assert sorted(path.name for path in (tmp_path / job.id).glob("*.png")) == sorted(names)

    with EmbeddedFarm(config) as restarted, grpc.insecure_channel(restarted.address, options=CHANNEL_OPTIONS) as channel:
        request = pb.StreamJobEventsRequest(job_id=job.id, after_seq=seen[-1].seq, omit_images=True)
        rest = list(RenderFarmStub(channel).StreamJobEvents(request))
    assert rest[-1].state == pb.JOB_STATE_SUCCEEDED
    names += [e.result.name for e in rest if e.WhichOneof("kind") == "result"]
    assert len(names) == len(set(names)) == 40  # the stored items were not redone
    assert sorted(path.name for path in (tmp_path / job.id).glob("*.png")) == sorted(names)
