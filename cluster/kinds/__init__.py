"""Job kinds, one module each: how a request of that kind is validated and planned into work items.

A new kind is one module here (with `STAGE`, `validate` and a Work with `items(job)` and `total`),
plus its message in the proto and its call in the SDK.
"""

from __future__ import annotations

import dataclasses
import sys

from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig, LimitsConfig
from renderfarm.cluster.constants import REQUEST_BYTES_BESIDES_SOURCES
from renderfarm.cluster.kinds import decode, img2img, inpaint, render, sweep, upscale
from renderfarm.cluster.validate import ModelLookup
from renderfarm.v1 import farm_pb2 as pb

KINDS = {"sweep": sweep, "decode": decode, "upscale": upscale, "img2img": img2img, "inpaint": inpaint, "render": render}
# A resumed job is re-planned, not re-admitted: limits are for admission, so a lowered one
# does not fail a job that is half done.
# max_request_bytes bounds what gRPC reads, and a resumed job was read long ago: it need only pass max_source_bytes.
NO_LIMITS = LimitsConfig(
    **{field.name: sys.maxsize for field in dataclasses.fields(LimitsConfig)}
    | {"max_request_bytes": sys.maxsize + REQUEST_BYTES_BESIDES_SOURCES}
)

# The kinds whose images a denoiser makes, step by step: the ones with step progress and previews.
PREVIEWED = ("sweep", "img2img", "inpaint", "render")

Work = sweep.Sweep | decode.Decode | upscale.Upscale | img2img.Edit | render.Render


def validate(request: pb.SubmitJobRequest, config: FarmConfig, model_info: ModelLookup) -> Work:
    """A new request's work, or InvalidJobError naming the field; `model_info` raises ValueError for an
    unresolvable model."""
    if request.request_id:
        fields.check_id("request_id", request.request_id)
    name = request.WhichOneof("kind")
    if name not in KINDS:
        raise fields.invalid("kind", f"the request names no job (set one of {', '.join(KINDS)})")
    if request.preview_every < 0:
        raise fields.invalid("preview_every", f"must be 0 (no previews) or more (got {request.preview_every})")
    if request.preview_every and name not in PREVIEWED:
        raise fields.invalid("preview_every", f"{name} jobs are not previewed; previews are of {', '.join(PREVIEWED)} images")
    return KINDS[name].validate(getattr(request, name), config, model_info)


def replan(request: pb.SubmitJobRequest, config: FarmConfig, model_info: ModelLookup) -> Work:
    """An admitted job's work again, for a scheduler that resumes it."""
    return validate(request, dataclasses.replace(config, limits=NO_LIMITS), model_info)


def stage(request: pb.SubmitJobRequest) -> str:
    """The stage a job's items enter the farm at."""
    return KINDS[request.WhichOneof("kind")].STAGE
