"""The inpaint job kind: one image repainted where its mask is white (StableDiffusionInpaintPipeline, a 9-channel
UNet), under every combination of the axes; img2img's work with a mask (kinds/img2img.py)."""

from __future__ import annotations

import hashlib

from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.constants import DEFAULT_INPAINT_STRENGTH
from renderfarm.cluster.kinds import img2img
from renderfarm.cluster.kinds.img2img import Edit, Source
from renderfarm.cluster.model_info import INPAINTING
from renderfarm.cluster.validate import ModelLookup
from renderfarm.v1 import farm_pb2 as pb

STAGE = img2img.STAGE


def validate(request: pb.InpaintSpec, config: FarmConfig, model_info: ModelLookup) -> Edit:
    limits = config.limits
    img2img._count("inpaint", request, 1, limits)
    if not request.image:
        raise fields.invalid("inpaint.image", "must be an image")
    if not request.mask:
        raise fields.invalid("inpaint.mask", "must be an image: white where the image is repainted")
    info = fields.model("inpaint.model", request.model, model_info, pipelines=INPAINTING)
    image = fields.decoded_image("inpaint.image", request.image, limits)
    mask = fields.decoded_image("inpaint.mask", request.mask, limits)
    if mask.size != image.size:
        raise fields.invalid(
            "inpaint.mask", f"is {mask.size[0]}x{mask.size[1]}; it must be the image's size, {image.size[0]}x{image.size[1]}"
        )
    width, height = img2img.source_size("inpaint.image", image, info, limits)
    source = Source(
        hashlib.sha256(request.image).hexdigest(), width, height, hashlib.sha256(request.mask).hexdigest(),
        image=request.image, mask=request.mask,
    )  # fmt: skip
    return img2img.edit("inpaint.", request, (source,), info, DEFAULT_INPAINT_STRENGTH, config)
