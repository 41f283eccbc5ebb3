"""TLS: what an address and the client's PEM arguments ask for, and a real TLS port on loopback that
checks client certificates and serves renewed files to new connections."""

import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from renderfarm._constants import CHANNEL_OPTIONS
from renderfarm._wire import channel_target
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.tls import server_credentials


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch):
    for name in ("RENDERFARM_TLS_CA", "RENDERFARM_TLS_CERT", "RENDERFARM_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)


def target(address: str, **given):
    return channel_target(address, **{"tls": None, "root_certificates": None, "client_certificate": None,
                                      "client_key": None} | given)  # fmt: skip


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


def test_the_scheme_says_tls_or_plaintext():
    host, credentials = target("grpcs://farm:50051")
    assert host == "farm:50051" and isinstance(credentials, grpc.ChannelCredentials)
    assert target("grpc://farm:50051") == ("farm:50051", None)
    assert target("farm:50051") == ("farm:50051", None)
    assert target("farm:50051", tls=True)[1] is not None


def test_a_ca_implies_tls(ca, tmp_path, monkeypatch):
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    for root_certificates in (ca.cert_pem.bytes(), str(tmp_path / "ca.pem"), tmp_path / "ca.pem"):
        assert target("farm:50051", root_certificates=root_certificates)[1] is not None
    monkeypatch.setenv("RENDERFARM_TLS_CA", str(tmp_path / "ca.pem"))
    assert target("farm:50051")[1] is not None
    # A CA in the environment does not override an address that says plaintext.
    assert target("grpc://farm:50051") == ("farm:50051", None)


@pytest.mark.parametrize(
    ("address", "given", "message"),
    [
        ("http://farm:50051", {}, "'http://farm:50051': the scheme must be grpcs://"),
        ("grpc://farm:50051", {"tls": True}, "says grpc://, which contradicts tls=True"),
        ("grpcs://farm:50051", {"tls": False}, "says grpcs://, which contradicts tls=False"),
        ("grpcs://farm:50051", {"client_certificate": b"cert"}, "client_certificate and client_key go together"),
        ("grpcs://farm:50051", {"client_key": b"key"}, "client_certificate and client_key go together"),
    ],
)
def test_contradictory_arguments_are_refused(address, given, message):
    with pytest.raises(ValueError, match=message):
        target(address, **given)


def chain(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)


def write_leaf(directory, ca: trustme.CA, *identities: str) -> tuple:
    """(cert chain file, key file) of a new certificate signed by `ca`, each replacing whatever was there."""
    leaf = ca.issue_cert(*identities)
    cert, key = directory / "tls.crt", directory / "tls.key"
    for path, pem in ((cert, chain(leaf)), (key, leaf.private_key_pem.bytes())):
        # A whole new file, the way a Secret's mount swaps its files.
        path.with_suffix(".new").write_bytes(pem)
        os.replace(path.with_suffix(".new"), path)
    return cert, key


@pytest.fixture
def serve(tmp_path):
    """Starts a health-only server on a loopback port with the TLS files of a FarmConfig; returns the port."""
    servers = []

    def start(cert, key, client_ca=None) -> int:
        config = FarmConfig(output_dir=tmp_path / "out", model_cache_dir=tmp_path / "models", state_dir=tmp_path / "state",
                            tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=client_ca)  # fmt: skip
        server = grpc.server(ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        port = server.add_secure_port("127.0.0.1:0", server_credentials(config))
        server.start()
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.stop(None)


def check(address: str, **given) -> str:
    """The health check's answer over a channel as renderfarm.Client builds it: SERVING, or the error's code."""
    host, credentials = target(address, **given)
    if credentials is None:
        channel = grpc.insecure_channel(host, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(host, credentials, options=CHANNEL_OPTIONS)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_a_tls_port_is_reached_over_tls_with_its_ca_only(ca, tmp_path, serve):
    port = serve(*write_leaf(tmp_path, ca, "127.0.0.1"))
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    assert check(f"grpcs://127.0.0.1:{port}", root_certificates=ca.cert_pem.bytes()) == "SERVING"
    assert check(f"127.0.0.1:{port}", root_certificates=tmp_path / "ca.pem") == "SERVING"
    assert check(f"grpc://127.0.0.1:{port}") == "UNAVAILABLE"
    assert check(f"grpcs://127.0.0.1:{port}", root_certificates=trustme.CA().cert_pem.bytes()) == "UNAVAILABLE"


def test_with_a_client_ca_only_clients_with_its_certificates_get_in(ca, tmp_path, serve):
    clients = trustme.CA()
    clients.cert_pem.write_to_path(tmp_path / "clients.pem")
    port = serve(*write_leaf(tmp_path, ca, "127.0.0.1"), client_ca=tmp_path / "clients.pem")
    address, trust = f"grpcs://127.0.0.1:{port}", {"root_certificates": ca.cert_pem.bytes()}
    assert check(address, **trust) == "UNAVAILABLE"
    for issuer, expected in ((clients, "SERVING"), (trustme.CA(), "UNAVAILABLE")):
        alice = issuer.issue_cert("alice@example.com")
        mine = {"client_certificate": chain(alice), "client_key": alice.private_key_pem.bytes()}
        assert check(address, **trust, **mine) == expected


def test_renewed_certificate_files_are_served_to_the_next_connection(ca, tmp_path, serve):
    port = serve(*write_leaf(tmp_path, ca, "127.0.0.1"))
    renewed = trustme.CA()
    address = f"grpcs://127.0.0.1:{port}"
    assert check(address, root_certificates=renewed.cert_pem.bytes()) == "UNAVAILABLE"
    write_leaf(tmp_path, renewed, "127.0.0.1")
    assert check(address, root_certificates=renewed.cert_pem.bytes()) == "SERVING"
    assert check(address, root_certificates=ca.cert_pem.bytes()) == "UNAVAILABLE"
