from pathlib import Path

import pytest

from renderfarm.v1 import generate

GENERATED = ("farm_pb2.py", "farm_pb2.pyi", "farm_pb2_grpc.py")


@pytest.mark.parametrize("name", GENERATED)
def test_committed_code_matches_the_proto(tmp_path, name):
    generate.generate(tmp_path)
    committed = generate.PROTO_ROOT / "renderfarm" / "v1" / name
    fresh = tmp_path / "renderfarm" / "v1" / name
    assert fresh.read_text() == committed.read_text(), f"{name} is stale: run python protos/renderfarm/v1/generate.py"


def test_generator_reads_the_committed_proto():
    assert (Path(generate.__file__).parent / "farm.proto").is_file()
