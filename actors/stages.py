"""The stage actors: thin Ray shells around txt2img's plain functions.

Each replica loads the components of its own stage only, for whichever model
a call names, keeping the most recently used few loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import ray
import torch

from renderfarm.actors import exchange, img2img, lora, previews, s3, tiled_decode, txt2img, upscale_x4
from renderfarm.actors.models import resolve_model, silence_progress_bars
from renderfarm.actors.s3 import S3Target
from renderfarm.actors.speed import Speed
from renderfarm.actors.tiles import Tile
from renderfarm.cluster.config import PoolConfig
from renderfarm.cluster.constants import MODELS_PER_REPLICA
from renderfarm.spec import ImageSpec, LoraSpec, encode_png

# Uploads of a batch's PNGs to an object store, a few at once.
_uploads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload")


def pick_device(dtype: str | None) -> tuple[str, torch.dtype]:
    """CUDA where there is one, and `dtype` (a pool's, by torch's name); None: fp16 on CUDA, fp32 on CPU for
    exact parity."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "float16" if device == "cuda" else "float32"
    return device, getattr(torch, dtype)


class _Stage:
    def __init__(self, model_cache_dir: str, pool: PoolConfig):
        """`pool`: the config of this replica's pool, whose dtype and speed options its models take."""
        self._model_cache_dir = Path(model_cache_dir)
        self._device, self._dtype = pick_device(pool.dtype)
        self._speed = Speed(pool.channels_last, pool.compile)
        self._loaded: OrderedDict[str, object] = OrderedDict()
        # A loaded model's LoRA adapters, made when a call first names LoRAs for it.
        self._adapters: dict[str, lora.Adapters] = {}
        self._model_loads = 0
        self._work_done = 0
        silence_progress_bars()

    def ready(self) -> tuple[str, str]:
        """The ids of the node this replica runs on and of the replica itself (the same after a restart)."""
        context = ray.get_runtime_context()
        return context.get_node_id(), context.get_actor_id()

    def stats(self) -> tuple[str, int, int, int]:
        """(node id, peak resident memory in bytes, models loaded, work done): see cluster/stats.py."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return ray.get_runtime_context().get_node_id(), peak, self._model_loads, self._work_done

    def _components(self, model: str):
        if model not in self._loaded:
            if len(self._loaded) >= MODELS_PER_REPLICA:
                evicted, _ = self._loaded.popitem(last=False)
                self._adapters.pop(evicted, None)
            self._loaded[model] = self._load(resolve_model(model, self._model_cache_dir))
            self._model_loads += 1
        self._loaded.move_to_end(model)
        return self._loaded[model]

    def _load(self, model_dir: Path):
        raise NotImplementedError

    def _use_loras(self, model: str, pipeline: str, modules: dict, loras: tuple[LoraSpec, ...]) -> None:
        """Makes exactly `loras` active on the model's `modules` (by pipeline component name); none: the model alone."""
        adapters = self._adapters.get(model)
        if adapters is None:
            if not loras:
                return
            adapters = self._adapters[model] = lora.Adapters(pipeline, modules)
        adapters.apply([(each.path, each.sha256, each.scale) for each in loras])


class TextEncoderStage(_Stage):
    def _load(self, model_dir: Path) -> txt2img.TextEncoders:
        return txt2img.load_text_encoders(model_dir, self._device, self._dtype)

    def encode(self, model: str, loras: tuple[LoraSpec, ...], *texts: str) -> tuple:
        """One TextEmbedding per text (with `loras` applied to the text encoders), each encoded alone (so
        batching never changes it), then a marker that the scheduler awaits to learn that the call ended;
        call with num_returns=len(texts)+1, so each embedding is an object of its own."""
        encoders = self._components(model)
        # The pipelines' names of the text encoders, the order TextEncoders holds them in.
        modules = dict(zip(("text_encoder", "text_encoder_2"), encoders.encoders))
        self._use_loras(model, encoders.pipeline, modules, loras)
        self._work_done += len(texts)
        return (*(txt2img.encode_text(encoders, text).cpu() for text in texts), True)


# A test hook, off unless set: with RENDERFARM_FAULT_OOM_ABOVE=N in a denoiser replica's environment, a batch
# of more than N images (its shape, padding included: what memory grows with) raises torch.OutOfMemoryError
# before it runs, as a GPU short of memory would, so that the engine's split shows on a CPU
# (tests/integration/test_out_of_memory.py).
FAULT_OOM_ABOVE = "RENDERFARM_FAULT_OOM_ABOVE"


def _inject_out_of_memory(images: int) -> None:
    if (above := os.environ.get(FAULT_OOM_ABOVE)) is not None and images > int(above):
        raise torch.OutOfMemoryError(f"{FAULT_OOM_ABOVE}={above}: a batch of {images} images (injected)")


class DenoiserStage(_Stage):
    def _load(self, model_dir: Path) -> txt2img.DenoiseComponents:
        return txt2img.load_denoiser(model_dir, self._device, self._dtype, self._speed)

    def denoise(
        self, model: str, loras: tuple[LoraSpec, ...], batch: txt2img.DenoiseBatch, texts: tuple[int, ...],
        *embeds: txt2img.TextEmbedding, watch: previews.Watch | None = None,
    ) -> Iterator:
        """`loras`: applied to the UNet; `embeds`: the batch's distinct text embeddings; `texts`: for each item's
        prompt, then (if guided) each item's negative prompt, the index of its embedding among them.

        A streaming generator (call with num_returns="streaming"): the StepReports `watch` asks for as the
        loop runs, then Denoised, then the latents."""
        count = len(batch.items)
        per_text = [embeds[index] for index in texts]
        components = self._components(model)
        self._use_loras(model, components.pipeline, {"unet": components.unet}, loras)
        steps = txt2img.denoising(components, batch, per_text[:count], per_text[count : 2 * count])
        yield from self._reported(steps, watch, components.pipeline, count)

    def denoise_sources(
        self, model: str, batch: txt2img.DenoiseBatch, strength: float, texts: tuple[int, ...],
        sources: tuple[int, ...], *objects, watch: previews.Watch | None = None,
    ) -> Iterator:
        """img2img and inpainting: each item starts from its source (SourceLatents) noised to `strength`.
        `objects`: the batch's distinct text embeddings and sources; `texts` (each item's prompt, then if guided
        its negative prompt) and `sources` (each item's) index them. Streams as denoise() does."""
        count = len(batch.items)
        per_text = [objects[index] for index in texts]
        components = self._components(model)
        # Without LoRAs: a sweep's may still be active on this replica's UNet.
        self._use_loras(model, components.pipeline, {"unet": components.unet}, ())
        steps = img2img.denoising(
            components, batch, strength, [objects[index] for index in sources], per_text[:count],
            per_text[count : 2 * count],
        )  # fmt: skip
        yield from self._reported(steps, watch, components.pipeline, count)

    def _reported(self, steps: Iterator[txt2img.Step], watch: previews.Watch | None, pipeline: str, count: int):
        # Both denoising paths run their loop here.
        _inject_out_of_memory(count)
        reporter = previews.Reporter(watch, pipeline)
        for step in steps:
            if (report := reporter.at(step)) is not None:
                yield report
        self._work_done += count
        yield previews.Denoised()
        yield step.latents.cpu()


class DecoderStage(_Stage):
    def _load(self, model_dir: Path):
        vae = txt2img.load_vae(model_dir, self._device, self._dtype, self._speed)
        return vae, tiled_decode.segments(vae)

    def decode(self, model: str, latents: torch.Tensor, specs: list[ImageSpec], target: S3Target | None = None,
               keys: list[str] | None = None) -> list:  # fmt: skip
        """PNG bytes of the first len(specs) items of `latents` (the rest is a batch's padding), each with its
        spec embedded. The whole batch is decoded at once, at the denoiser's fixed shape for its key, so an
        image's pixels do not depend on its companions here either. With an object store `target`, each PNG
        is put there under its key instead, and its StoredImage returned."""
        vae, _ = self._components(model)
        self._work_done += len(specs)
        images = txt2img.decode(vae, latents)
        pngs = [encode_png(image, spec) for image, spec in zip(images, specs)]
        if target is None:
            return pngs
        # The PUTs wait on the network, not the CPU: a batch's go at once.
        return list(_uploads.map(lambda key, png: s3.put_png(target, key, png), keys, pngs))

    def encode_source(self, model: str, image: bytes, width: int, height: int, mask: bytes | None = None):
        """A source image (and, to inpaint, its mask) encoded at (width, height): the same SourceLatents for every
        seed that renders from it, so it is encoded once. Then a marker that the scheduler awaits to learn that
        the call ended; call with num_returns=2."""
        vae, _ = self._components(model)
        with PIL.Image.open(io.BytesIO(image)) as source:
            rgb = source.convert("RGB")
        if mask is None:
            return img2img.encode_source(vae, rgb, width, height), True
        with PIL.Image.open(io.BytesIO(mask)) as mask_image:
            mask_image.load()
            return img2img.encode_source(vae, rgb, width, height, mask_image), True

    def decode_apart(self, model: str, latents: torch.Tensor, specs: list[ImageSpec]) -> tuple:
        """decode()'s PNGs, each an object of its own, then their SHA-256 digests; call with num_returns=len(specs)+1."""
        pngs = self.decode(model, latents, specs)
        return (*pngs, [hashlib.sha256(png).hexdigest() for png in pngs])

    # The tiled decode, one step per call; the dispatcher drives the steps across replicas.
    def tiled_prepare(self, model: str, latents, item: int, tiles: list[Tile]):
        """Returns each tile's input state, then the first norm's sums (call with num_returns=len(tiles)+1).
        `latents`: a decode job's array, or a denoiser's tensor (in its dtype, which numpy may lack: bfloat16)."""
        latents = latents[item : item + 1]
        if isinstance(latents, np.ndarray):
            # Arrays from Ray's object store are read-only: copy the one item.
            latents = torch.from_numpy(np.array(latents))
        vae, _ = self._components(model)
        states, sums = tiled_decode.prepare(vae, latents, tiles)
        return (*(_on(state, "cpu") for state in states), sums)

    def tiled_segment(self, model: str, index: int, tile: Tile, state, sums):
        """Runs one segment on one tile: (new state, next norm's partial sums) or, after the last, (RGB core, None)."""
        _, cut = self._components(model)
        state, next_sums = tiled_decode.run_segment(cut, index, tile, _on(state, self._device), sums)
        if next_sums is None:
            return tiled_decode.to_pixels(tile, state, cut[-1].scale), None
        # States travel through Ray's object store, which holds CPU memory.
        return _on(state, "cpu"), next_sums

    def tiled_assemble(self, tiles: list[Tile], spec, target: S3Target | None, key: str | None, *cores):
        """The image's PNG bytes, or with an object store `target`, its StoredImage, put there under `key`."""
        scale = cores[0].shape[0] // (tiles[0].bottom - tiles[0].top)
        png = encode_png(tiled_decode.assemble(tiles, list(cores), scale), spec)
        return png if target is None else s3.put_png(target, key, png)


@dataclass(frozen=True)
class Spread:
    """One party of an image whose UNet windows are spread over `parties` upscaler replicas."""

    exchange: object  # the WindowExchange actor
    session: str  # one per image
    rank: int
    parties: int


class UpscalerStage(_Stage):
    def _load(self, model_dir: Path):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(
            model_dir, subfolder="unet", dtype=self._dtype, use_safetensors=True
        )
        upscale_x4.synchronise_group_norms(unet)
        unet = unet.to(self._device).eval()
        self._speed.apply(unet, compiled=unet)
        vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
        return (
            unet,
            json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text()),
            json.loads((model_dir / "low_res_scheduler" / "scheduler_config.json").read_text()),
            2 ** (len(vae_config["block_out_channels"]) - 1),
        )

    def upscale(self, model: str, image: bytes, spec, *embeds: txt2img.TextEmbedding) -> torch.Tensor:
        """The final latents of one image; `embeds`: the prompt's, then (if guided) the negative prompt's."""
        return self._upscale(model, image, spec, embeds, upscale_x4.Share())

    def upscale_part(self, model: str, image: bytes, spec, *embeds: txt2img.TextEmbedding, spread: Spread):
        """This replica's share of an image's windows; call with num_returns=2.

        Returns rank 0's latents (None from the other parties, whose latents are the same) and a
        marker that the scheduler awaits to learn that the part ended, without pulling latents.
        """
        latents = self._upscale(model, image, spec, embeds, self._share(spread))
        self._work_done += 1
        return (latents if spread.rank == 0 else None), True

    def _upscale(self, model: str, image: bytes, spec, embeds, share: upscale_x4.Share) -> torch.Tensor:
        import diffusers

        unet, scheduler_config, low_res_config, vae_scale_factor = self._components(model)
        with PIL.Image.open(io.BytesIO(image)) as source:
            low_res = upscale_x4.preprocess(source.convert("RGB"), vae_scale_factor)
        latents = upscale_x4.upscale_latents(
            unet,
            # Fresh schedulers of the model's own classes: the loop changes their state.
            getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
            getattr(diffusers, low_res_config["_class_name"]).from_config(low_res_config),
            low_res,
            embeds[0],
            embeds[1] if len(embeds) > 1 else None,
            spec.steps,
            spec.guidance_scale,
            spec.noise_level,
            spec.seed,
            tile=spec.tile,
            share=share,
        )
        return latents.cpu()

    def _share(self, spread: Spread) -> upscale_x4.Share:
        def gather(values: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
            # Ray's object store holds CPU memory.
            part = {index: value.cpu() for index, value in values.items()}
            merged = ray.get(spread.exchange.gather.remote(spread.session, spread.parties, part))
            return {index: value.to(self._device) for index, value in merged.items()}

        return upscale_x4.Share(spread.rank, spread.parties, gather)


def _on(state: tiled_decode.TileState, device: str) -> tiled_decode.TileState:
    return {name: tensor.to(device) for name, tensor in state.items()}


TextEncoder = ray.remote(TextEncoderStage)
Denoiser = ray.remote(DenoiserStage)
Decoder = ray.remote(DecoderStage)
Upscaler = ray.remote(UpscalerStage)
# Async and without a CPU of its own: it only waits and merges small tensors.
WindowExchange = ray.remote(num_cpus=0)(exchange.WindowExchange)
