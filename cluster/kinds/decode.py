"""The decode job kind: given latents into one image, in tiles spread over the VAE replicas."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from renderfarm.cluster import validate as fields
from renderfarm.cluster.config import FarmConfig
from renderfarm.cluster.scheduler import Item
from renderfarm.cluster.validate import ModelLookup
from renderfarm.spec import DecodedImageSpec
from renderfarm.v1 import farm_pb2 as pb

STAGE = "decoder"


@dataclass(frozen=True)
class Decode:
    """A validated decode job: one image from given latents, in tiles of `core` latent pixels with `halo`."""

    latents: object  # numpy float32 [1, C, h, w]
    spec: DecodedImageSpec
    core: int
    halo: int
    total: int = 1


    def items(self, job) -> Iterator[Item]:
        """The one image, unless `job` (its record in the job store) has its result."""
        if not job.is_done(self.spec):
            payload = (self.latents, self.core, self.halo)
            yield Item(job.id, self.spec, self.spec.model, ("decode", self.spec.file_name), payload, job.failures(self.spec))


def validate(decode: pb.DecodeSpec, config: FarmConfig, model_info: ModelLookup) -> Decode:
    # Checked as float32, what the VAE takes: a float64 1e300 is finite, and inf once cast.
    with np.errstate(over="ignore"):
        latents = _latents(decode.latents_npy).astype(np.float32)
    if not np.isfinite(latents).all():
        raise fields.invalid("decode.latents_npy", "must hold finite numbers only, as float32")
    info = fields.model("decode.model", decode.model, model_info)
    scale, limits = info.vae_scale_factor, config.limits
    if latents.shape[1] != info.latent_channels:
        raise fields.invalid("decode.latents_npy", f"has {latents.shape[1]} channels; the model's VAE takes {info.latent_channels}")
    height, width = latents.shape[2] * scale, latents.shape[3] * scale
    if max(height, width) > limits.max_side:
        raise fields.invalid("decode.latents_npy", f"decodes to {width}x{height}, over the limit of {limits.max_side} a side")
    fields.pixels("decode.latents_npy", width, height, limits)
    tile = decode.tile or config.decode_tile
    if tile <= 0 or tile % scale or tile > limits.max_side:
        raise fields.invalid("decode.tile", f"must be a positive multiple of {scale} up to {limits.max_side} (got {tile})")
    overlap = decode.overlap or info.decode_halo * scale
    if overlap < 0 or overlap % scale or overlap > limits.max_side:
        raise fields.invalid("decode.overlap", f"must be a multiple of {scale} from 0 to {limits.max_side} (got {overlap})")
    spec = DecodedImageSpec(
        model=decode.model,
        latents_sha256=hashlib.sha256(np.ascontiguousarray(latents).tobytes()).hexdigest(),
        width=width,
        height=height,
        tile=tile,
        overlap=overlap,
    )
    return Decode(latents=latents, spec=spec, core=tile // scale, halo=overlap // scale)


def _latents(npy: bytes) -> np.ndarray:
    field, stream = "decode.latents_npy", io.BytesIO(npy)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = read_header[version](stream)
    except Exception as error:  # numpy raises several types for a malformed header
        raise fields.invalid(field, f"is not a NumPy .npy array of format 1.0 or 2.0 ({error})") from None
    if dtype.kind != "f" or len(shape) != 4 or shape[0] != 1 or 0 in shape:
        raise fields.invalid(field, f"must be a float array [1, C, h, w] (got {dtype} {shape})")
    # numpy allocates the shape its header claims before reading: check the claim against the bytes sent.
    data_bytes, claimed_bytes = len(npy) - stream.tell(), math.prod(shape) * dtype.itemsize
    if data_bytes != claimed_bytes:
        raise fields.invalid(field, f"holds {data_bytes} bytes of data; its header's {dtype} {shape} needs {claimed_bytes}")
    return np.load(io.BytesIO(npy), allow_pickle=False)
