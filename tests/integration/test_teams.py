"""Teams on one farm served over TLS: users from a keys file, isolation, quotas, weighted shares.

Every RPC of the service descriptor is called; a new RPC without a case here fails the first test.
"""

import asyncio
import re
import subprocess
import time

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

import renderfarm as rf
from renderfarm.cluster.config import AuthConfig
from renderfarm.cluster.keys import add_user
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub
from tests.integration.processes import RENDERFARM

SMALL = dict(steps=2, width=64, height=64)
METHODS = pb.DESCRIPTOR.services_by_name["RenderFarm"].methods
# One request per RPC, for a given job id.
REQUESTS = {
    "SubmitJob": lambda job_id: pb.SubmitJobRequest(sweep=pb.SweepSpec(model="builtin:tiny-sd", prompts=["a fox"])),
    "GetJob": lambda job_id: pb.GetJobRequest(job_id=job_id),
    "ListJobs": lambda job_id: pb.ListJobsRequest(),
    "CancelJob": lambda job_id: pb.CancelJobRequest(job_id=job_id),
    "StreamJobEvents": lambda job_id: pb.StreamJobEventsRequest(job_id=job_id),
    "DeleteJob": lambda job_id: pb.DeleteJobRequest(job_id=job_id),
}
BY_JOB_ID = [method.name for method in METHODS if "job_id" in method.input_type.fields_by_name]


class Team:
    def __init__(self, directory):
        self.ca = trustme.CA()
        self.ca_pem = self.ca.cert_pem.bytes()
        self.keys_file = directory / "keys.toml"
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = directory / "farm.crt", directory / "farm.key"
        server.private_key_pem.write_to_path(self.key_file)
        server.cert_chain_pems[0].write_to_path(self.cert_file)
        self.tokens = {
            "alice": add_user(self.keys_file, "alice", weight=3),
            "bob": add_user(self.keys_file, "bob"),
            "carol": add_user(self.keys_file, "carol", role="admin"),
            "dave": add_user(self.keys_file, "dave", max_concurrent_jobs=1, max_images_per_day=10),
        }

    def client(self, farm, user: str | None) -> rf.Client:
        token = self.tokens[user] if user else None
        return rf.Client(f"grpcs://{farm.address}", token=token, root_certificates=self.ca_pem)

    def channel(self, farm) -> grpc.Channel:
        return grpc.secure_channel(farm.address, grpc.ssl_channel_credentials(self.ca_pem))


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    return Team(tmp_path_factory.mktemp("team"))


@pytest.fixture
def farm(start_farm, team):
    return start_farm(
        auth=AuthConfig(keys_file=team.keys_file),
        tls_cert_file=team.cert_file,
        tls_key_file=team.key_file,
        health_port=0,
    )


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("RENDERFARM_TOKEN", raising=False)


def call(farm, team, method: str, request, metadata=()):
    """The RPC's status code and details, for a raw call that sends exactly `metadata`."""
    with team.channel(farm) as channel:
        behaviour = getattr(RenderFarmStub(channel), method)
        try:
            response = behaviour(request, metadata=metadata, timeout=30)
            if method == "StreamJobEvents":
                list(response)
        except grpc.RpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def everything(farm, team) -> list[rf.JobStatus]:
    with team.client(farm, "carol") as admin:
        return admin.jobs()


def test_the_cases_cover_every_rpc():
    assert set(REQUESTS) == {method.name for method in METHODS}


@pytest.mark.parametrize("method", [method.name for method in METHODS])
def test_every_rpc_without_a_known_token_is_unauthenticated_and_creates_nothing(farm, team, method):
    before = everything(farm, team)
    with team.client(farm, "alice") as alice:
        job = alice.sweep("a red fox", seeds=0, **SMALL)
        job.wait()
    sent = [(), (("authorization", "Bearer wrong"),), (("authorization", team.tokens["alice"]),)]
    # The hash is what the keys file holds; it is not a token.
    sent.append((("authorization", "Bearer " + re.findall(r'token_sha256 = "(\w+)"', team.keys_file.read_text())[0]),))
    for metadata in sent:
        code, details = call(farm, team, method, REQUESTS[method](job.id), metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, details)
        assert "token" in details
    after = {status.id: status for status in everything(farm, team)}
    assert set(after) == {status.id for status in before} | {job.id}
    assert after[job.id].state == rf.JobState.SUCCEEDED  # the refused CancelJob cancelled nothing


def test_another_users_job_answers_exactly_as_an_unknown_one(farm, team):
    with team.client(farm, "alice") as alice, team.client(farm, "bob") as bob:
        job = alice.sweep("a red fox", seeds=range(64), **SMALL)
        metadata = (("authorization", "Bearer " + team.tokens["bob"]),)
        for method in BY_JOB_ID:
            unknown = call(farm, team, method, REQUESTS[method]("0123456789abcdef"), metadata)
            other = call(farm, team, method, REQUESTS[method](job.id), metadata)
            assert unknown[0] == other[0] == grpc.StatusCode.NOT_FOUND, method
            assert other[1] == unknown[1].replace("0123456789abcdef", job.id), method
        assert job.id not in {status.id for status in bob.jobs()}
        with pytest.raises(rf.PermissionDeniedError, match="owner"):
            bob.jobs(owner="alice")
        # Request ids are each user's own: bob reusing alice's makes bob a job, not a handle on hers.
        mine = bob.sweep("a red fox", seeds=0, request_id="shared-id", **SMALL)
        theirs = alice.sweep("a red fox", seeds=0, request_id="shared-id", **SMALL)
        assert mine.id != theirs.id
        assert alice.sweep("a red fox", seeds=0, request_id="shared-id", **SMALL).id == theirs.id
        with pytest.raises(rf.InvalidJobError, match=theirs.id) as raised:
            alice.sweep("a fox", request_id="shared-id")
        assert raised.value.field == "request_id"

        assert job.status().state in (rf.JobState.QUEUED, rf.JobState.RUNNING)
        assert job.status().owner == "alice"
        with team.client(farm, "carol") as admin:
            assert {status.owner for status in admin.jobs(owner="alice")} == {"alice"}
            assert job.id in {status.id for status in admin.jobs()}
            assert admin.job(job.id).cancel().owner == "alice"  # admins may cancel anyone's job
        assert job.wait().state == rf.JobState.CANCELLED
        mine.wait(), theirs.wait()


def test_a_plaintext_client_cannot_use_the_tls_port_and_health_has_its_own(farm, team):
    with rf.Client(farm.address, token=team.tokens["alice"], timeout=5) as plaintext:
        with pytest.raises(rf.FarmUnavailableError):
            plaintext.jobs()
    with grpc.insecure_channel(f"127.0.0.1:{farm.farm.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(service="renderfarm.v1.RenderFarm"), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:  # that port serves health alone
            RenderFarmStub(channel).ListJobs(pb.ListJobsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_async_client_speaks_tls_too(farm, team):
    async def owners() -> set[str]:
        async with rf.AsyncClient(f"grpcs://{farm.address}", token=team.tokens["bob"], root_certificates=team.ca_pem) as bob:
            job = await bob.sweep("a red fox", seeds=0, **SMALL)
            await job.wait()
            return {status.owner for status in await bob.jobs()}

    assert asyncio.run(owners()) == {"bob"}


def test_quotas_refuse_one_user_and_not_another(farm, team):
    with team.client(farm, "dave") as dave, team.client(farm, "bob") as bob:
        first = dave.sweep("a red fox", seeds=range(8), **SMALL)
        with pytest.raises(rf.CapacityError, match=r"max_concurrent_jobs = 1\).*when one of them ends"):
            dave.sweep("a red fox", seeds=0, **SMALL)
        other = bob.sweep("a red fox", seeds=range(4), **SMALL)
        first.wait(), other.wait()
        # 8 of dave's 10 images a day are spent: 2 more fit, 3 do not, and the message says when they will.
        with pytest.raises(rf.CapacityError, match=r"max_images_per_day = 10\)\. Room for them frees up at .* UTC"):
            dave.sweep("a red fox", seeds=range(3), **SMALL)
        assert dave.sweep("a red fox", seeds=range(2), **SMALL).wait().state == rf.JobState.SUCCEEDED
        assert bob.sweep("a red fox", seeds=range(16), **SMALL).wait().completed == 16


def test_users_weighted_three_to_one_get_images_three_to_one(farm, team):
    with team.client(farm, "alice") as alice, team.client(farm, "bob") as bob:
        heavy = alice.sweep("a lighthouse", seeds=range(240), **SMALL)
        light = bob.sweep("a lighthouse", seeds=range(1000, 1400), **SMALL)
        assert heavy.wait().completed == 240
        light_done = light.status().completed
        light.cancel()
        light.wait()
    # Alice's 240 take three quarters of the first ~320 images; bob's in-flight batch may land with her last.
    assert 240 / 3.45 <= light_done <= 240 / 2.55, light_done


def test_a_user_added_with_the_cli_works_without_a_restart(farm, team):
    added = subprocess.run(
        [*RENDERFARM, "keys", "add", "erin", "--keys-file", str(team.keys_file)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    token = added.stdout.strip()
    assert token.startswith("rf_") and token not in team.keys_file.read_text()
    team.tokens["erin"] = token
    with team.client(farm, "erin") as erin:
        assert erin.jobs() == []
        job = erin.sweep("a red fox", seeds=0, **SMALL)
        assert job.wait().state == rf.JobState.SUCCEEDED and job.status().owner == "erin"
    subprocess.run([*RENDERFARM, "keys", "remove", "erin", "--keys-file", str(team.keys_file)], check=True)
    deadline = time.monotonic() + 10
    with team.client(farm, "erin") as erin:
        while True:
            try:
                erin.jobs()
            except rf.AuthenticationError:
                break
            assert time.monotonic() < deadline, "a removed user's token still works"
            time.sleep(0.1)
