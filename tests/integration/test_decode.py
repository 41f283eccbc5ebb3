"""Tiled VAE decode across VAE replicas: equal to the one-piece decode, whatever the replica count."""

import io

import grpc
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

import renderfarm as rf
from renderfarm._constants import CHANNEL_OPTIONS
from renderfarm.actors.models import resolve_model
from renderfarm.cli import main as cli
from renderfarm.spec import DecodedImageSpec, read_spec
from renderfarm.v1 import farm_pb2 as pb
from renderfarm.v1.farm_pb2_grpc import RenderFarmStub

from .conftest import pixels


@pytest.fixture(scope="module")
def vae(model_cache_dir) -> AutoencoderKL:
    """builtin:tiny-sd's VAE: the SD decoder architecture (4 levels, 8x), narrow."""
    return AutoencoderKL.from_pretrained(resolve_model("builtin:tiny-sd", model_cache_dir), subfolder="vae").eval()


def latents(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, height, width)).astype(np.float32)


def postprocess(sample: torch.Tensor) -> np.ndarray:
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(sample, output_type="pil")[0]).astype(float)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = ((image.astype(float) - reference) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_tiled_decode_on_two_replicas_equals_the_one_piece_decode(start_farm, vae):
    z = latents(64, 64)
    with rf.Client(start_farm(decoders=2).address) as client:
        (result,) = client.decode(z, tile=128).results()
    assert result.image.size == (512, 512)
    with torch.inference_mode():
        one_piece = postprocess(vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample)
        # diffusers' tiles at the same size: tile_sample_min_size is already 128 px for this VAE.
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (128, 16)
        vae.enable_tiling()
        try:
            diffusers_tiled = postprocess(vae.decode(torch.from_numpy(z) / vae.config.scaling_factor).sample)
        finally:
            vae.disable_tiling()
    ours = psnr(np.asarray(result.image), one_piece)
    assert ours >= 55
    assert psnr(diffusers_tiled, one_piece) < ours


def test_replica_count_does_not_change_a_pixel(start_farm):
    z = latents(40, 72, seed=1)
    images = []
    for decoders in (1, 3):
        with rf.Client(start_farm(decoders=decoders).address) as client:
            (result,) = client.decode(z, tile=128).results()
        images.append(np.asarray(result.image))
    assert np.array_equal(*images)


def test_a_270x480_latent_decodes_to_a_3840x2160_png(start_farm):
    z = latents(270, 480, seed=2)
    with rf.Client(start_farm(decoders=2).address) as client:
        (result,) = client.decode(z).results()
    assert result.image.size == (3840, 2160)
    spec = read_spec(result.png)
    assert isinstance(spec, DecodedImageSpec) and (spec.width, spec.height, spec.tile) == (3840, 2160, 512)
    assert spec == result.spec


def test_large_sweep_images_are_decoded_tiled_and_match_diffusers(start_farm, reference):
    # A low threshold makes a small image "large", so the one-piece diffusers reference stays cheap.
    farm = start_farm(decoders=2, tiled_decode_above_pixels=128 * 128, decode_tile=64)
    with rf.Client(farm.address) as client:
        (result,) = client.sweep("a lighthouse", steps=3, width=192, height=256).results()
    difference = np.abs(np.asarray(result.image).astype(int) - reference(result.spec).astype(int))
    assert difference.max() <= 1


def test_cli_decode_writes_one_png(start_farm, tmp_path):
    np.save(tmp_path / "latents.npy", latents(16, 24))
    out = tmp_path / "out"
    assert cli(["decode", str(tmp_path / "latents.npy"), "--out", str(out), "--tile", "64",
                "--address", start_farm().address]) == 0  # fmt: skip
    (png,) = out.glob("*.png")
    assert pixels(png).shape == (128, 192, 3) and read_spec(png).tile == 64


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


BAD_DECODES = [
    ("decode.latents_npy", dict(latents_npy=b"not an npy file")),
    ("decode.latents_npy", dict(latents_npy=npy(np.zeros((1, 4, 8, 8), dtype=np.int32)))),
    ("decode.latents_npy", dict(latents_npy=npy(np.zeros((4, 8, 8), dtype=np.float32)))),
    ("decode.latents_npy", dict(latents_npy=npy(np.zeros((1, 3, 8, 8), dtype=np.float32)))),
    ("decode.latents_npy", dict(latents_npy=npy(np.full((1, 4, 8, 8), np.nan, dtype=np.float32)))),
    ("decode.latents_npy", dict(latents_npy=npy(np.zeros((1, 4, 8, 1000), dtype=np.float32)))),
    ("decode.tile", dict(tile=100)),
    ("decode.overlap", dict(overlap=-8)),
    ("decode.model", dict(model="builtin:nope")),
]


@pytest.mark.parametrize("field, fields", BAD_DECODES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_DECODES)])
def test_bad_decodes_are_invalid_argument_naming_the_field(farm, field, fields):
    decode = {"model": "builtin:tiny-sd", "latents_npy": npy(latents(8, 8))} | fields
    with grpc.insecure_channel(farm.address, options=CHANNEL_OPTIONS) as channel:
        stub = RenderFarmStub(channel)
        before = len(stub.ListJobs(pb.ListJobsRequest()).jobs)
        with pytest.raises(grpc.RpcError) as raised:
            stub.SubmitJob(pb.SubmitJobRequest(decode=pb.DecodeSpec(**decode)))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(f"{field}: ")
        assert len(stub.ListJobs(pb.ListJobsRequest()).jobs) == before
