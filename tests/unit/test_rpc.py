import pytest

from renderfarm.cluster.rpc import UnparsableRequest, bad_utf8_field, request_parser
from renderfarm.v1 import farm_pb2 as pb

P = "PLACEHOLDER"


def with_bad_utf8(message) -> bytes:
    """The message's bytes with its one P string replaced, same length, by bytes that are not UTF-8."""
    data = message.SerializeToString()
    assert data.count(P.encode()) == 1
    return data.replace(P.encode(), b"\xff" * len(P))
CASES = [
    ("request_id", pb.SubmitJobRequest(request_id=P, sweep=pb.SweepSpec(prompts=["a"]))),
    ("sweep.model", pb.SubmitJobRequest(sweep=pb.SweepSpec(model=P, prompts=["a"]))),
    ("sweep.prompts[0]", pb.SubmitJobRequest(sweep=pb.SweepSpec(prompts=[P]))),
    ("sweep.prompts[2]", pb.SubmitJobRequest(sweep=pb.SweepSpec(prompts=["a", "b", P], seeds=[1, 2]))),
    ("sweep.negative_prompt", pb.SubmitJobRequest(sweep=pb.SweepSpec(prompts=["a"], negative_prompt=P))),
    ("sweep.schedulers[1]", pb.SubmitJobRequest(sweep=pb.SweepSpec(prompts=["a"], schedulers=["ddim", P]))),
    ("upscale.prompt", pb.SubmitJobRequest(upscale=pb.UpscaleSpec(images=[b"\xff\xfe"], prompt=P))),
    ("decode.model", pb.SubmitJobRequest(decode=pb.DecodeSpec(model=P, latents_npy=b"\xff"))),
    ("job_id", pb.GetJobRequest(job_id=P)),
]


@pytest.mark.parametrize("field, message", CASES, ids=[field for field, _ in CASES])
def test_the_string_field_that_is_not_utf8_is_named(field, message):
    data = with_bad_utf8(message)
    assert bad_utf8_field(message.DESCRIPTOR, data) == field
    parsed = request_parser(type(message))(data)
    assert isinstance(parsed, UnparsableRequest)
    assert parsed.error.field == field and str(parsed.error) == f"{field}: is not valid UTF-8"


def test_bytes_fields_may_hold_anything():
    message = pb.SubmitJobRequest(upscale=pb.UpscaleSpec(images=[b"\xff\xfe\x00"], prompt="a"))
    assert request_parser(pb.SubmitJobRequest)(message.SerializeToString()) == message


def test_bytes_that_are_no_message_are_named_as_the_request():
    data = pb.SubmitJobRequest(sweep=pb.SweepSpec(prompts=["a red fox"])).SerializeToString()[:-3]
    parsed = request_parser(pb.SubmitJobRequest)(data)
    assert bad_utf8_field(pb.SubmitJobRequest.DESCRIPTOR, data) is None
    assert parsed.error.field == "request"
    assert str(parsed.error).startswith("request: is not a renderfarm.v1.SubmitJobRequest")


def raw_field(number: int, wire_type: int, payload: bytes) -> bytes:
    from google.protobuf.internal.encoder import _VarintBytes

    key = _VarintBytes(number << 3 | wire_type)
    return key + (_VarintBytes(len(payload)) + payload if wire_type == 2 else payload)


@pytest.mark.parametrize(
    "data, field",
    [
        # Seeds (int64) as a double: protobuf would keep it aside and render seed 0.
        (raw_field(2, 2, raw_field(4, 1, b"\0" * 8)), "sweep.seeds"),
        # A size's width (int32) as a fixed32, inside a repeated message.
        (raw_field(2, 2, raw_field(7, 2, raw_field(1, 5, b"\0" * 4))), "sweep.sizes[0].width"),
        (raw_field(2, 2, raw_field(500, 0, b"\x01")), "sweep"),
        (raw_field(77, 0, b"\x01"), "request"),
    ],
)
def test_a_mistyped_or_unknown_field_is_refused_by_name(data, field):
    parsed = request_parser(pb.SubmitJobRequest)(data)
    assert isinstance(parsed, UnparsableRequest) and parsed.error.field == field


def test_every_well_typed_request_parses_whatever_the_encoding_of_its_repeated_numbers():
    packed = pb.SubmitJobRequest(sweep=pb.SweepSpec(model="m", seeds=[1, 2], sizes=[pb.Size(width=8, height=8)]))
    unpacked = raw_field(2, 2, raw_field(1, 2, b"m") + raw_field(4, 0, b"\x01") + raw_field(4, 0, b"\x02")
                         + raw_field(7, 2, raw_field(1, 0, b"\x08") + raw_field(2, 0, b"\x08")))  # fmt: skip
    assert request_parser(pb.SubmitJobRequest)(packed.SerializeToString()) == packed
    assert request_parser(pb.SubmitJobRequest)(unpacked) == packed
