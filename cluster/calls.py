"""How each stage actor method is called: its argument layout, its num_returns, and what must come back.

The one place that knows the actors' calling conventions (actors/stages.py);
the executor calls these functions, never `.remote` itself. A stage that
returns other than it promised (say, fewer PNGs than specs) raises
StageContractError here, at the boundary, not as a zip that quietly drops
images further on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from renderfarm.actors import stages, tiled_decode
from renderfarm.actors.previews import Denoised, StepReport, Watch
from renderfarm.actors.s3 import S3Target, StoredImage
from renderfarm.actors.tiles import plan_tiles
from renderfarm.actors.txt2img import DenoiseBatch
from renderfarm.cluster.model_info import ModelInfo
from renderfarm.spec import LoraSpec

# Called with each StepReport of a batch as it denoises.
OnReport = Callable[[StepReport], None]


class StageContractError(RuntimeError):
    """A stage replica returned something other than its method promises."""


def _expect(method: str, values: Sequence, count: int) -> None:
    if len(values) != count:
        raise StageContractError(f"{method} returned {len(values)} values for {count} inputs")


async def ready(actor) -> tuple[str, str]:
    """The ids of the node the replica runs on and of the replica (as a RayActorError names it), once it has
    started."""
    return tuple(await actor.ready.remote())


def stats(actor):
    """A ref to the replica's (node id, peak RSS bytes, models loaded, work done)."""
    return actor.stats.remote()


def exchange_stats(exchange) -> list:
    """Refs to the window exchange's open sessions and its peak RSS bytes."""
    return [exchange.sessions.remote(), exchange.peak_rss_bytes.remote()]


def close_session(exchange, session: str) -> None:
    exchange.close.remote(session)


def abort_session(exchange, session: str, why: str) -> None:
    """Releases the parties of a spread image that wait for a failed one."""
    exchange.abort.remote(session, why)


def encode(actor, model: str, loras: Sequence[LoraSpec], texts: Sequence[str]) -> tuple[list, object]:
    """One embedding ref per text (with `loras` applied to the text encoders), and a marker that resolves
    when the call has ended."""
    *embeddings, done = actor.encode.options(num_returns=len(texts) + 1).remote(model, tuple(loras), *texts)
    return embeddings, done


async def denoise(actor, model: str, loras: Sequence[LoraSpec], batch: DenoiseBatch, prompt_embeds: Sequence,
                  negative_embeds: Sequence, watch: Watch | None, on_report: OnReport):  # fmt: skip
    """The latents ref [B, C, h, w], once the batch is denoised; `on_report` gets the StepReports `watch` asks
    for as it runs.

    Each distinct embedding ref goes once, with each text's index among them: a batch's items mostly
    share their texts, and the replica would otherwise fetch and deserialise one copy per item.
    """
    if len(prompt_embeds) != len(batch.items) or len(negative_embeds) not in (0, len(batch.items)):
        raise StageContractError(
            f"a denoise batch of {len(batch.items)} got {len(prompt_embeds)} and {len(negative_embeds)} embeddings"
        )
    refs = [*prompt_embeds, *negative_embeds]
    distinct = {ref: index for index, ref in enumerate(dict.fromkeys(refs))}
    stream = actor.denoise.options(num_returns="streaming").remote(
        model, tuple(loras), batch, tuple(distinct[ref] for ref in refs), *distinct, watch=watch
    )
    return await _reported("denoise", stream, on_report)


async def denoise_sources(actor, model: str, batch: DenoiseBatch, strength: float, prompt_embeds: Sequence,
                          negative_embeds: Sequence, sources: Sequence, watch: Watch | None,
                          on_report: OnReport):  # fmt: skip
    """The latents ref [B, C, h, w] of an img2img or inpaint batch: each item from its source (a SourceLatents ref),
    noised to `strength`. Distinct refs go once, and reports stream, as in denoise()."""
    if len(prompt_embeds) != len(batch.items) or len(sources) != len(batch.items) or len(negative_embeds) not in (
        0, len(batch.items)
    ):  # fmt: skip
        raise StageContractError(
            f"a denoise batch of {len(batch.items)} got {len(prompt_embeds)} and {len(negative_embeds)} embeddings "
            f"and {len(sources)} sources"
        )
    texts = [*prompt_embeds, *negative_embeds]
    distinct = {ref: index for index, ref in enumerate(dict.fromkeys([*texts, *sources]))}
    stream = actor.denoise_sources.options(num_returns="streaming").remote(
        model, batch, strength, tuple(distinct[ref] for ref in texts), tuple(distinct[ref] for ref in sources),
        *distinct, watch=watch,
    )  # fmt: skip
    return await _reported("denoise_sources", stream, on_report)


async def _reported(method: str, stream, on_report: OnReport):
    """Hands a denoiser stream's reports to `on_report`; returns the ref after Denoised (the latents), unpulled."""
    async for ref in stream:
        report = await ref
        if isinstance(report, Denoised):
            async for latents in stream:
                return latents
        elif isinstance(report, StepReport):
            on_report(report)
        else:
            raise StageContractError(f"{method} streamed a {type(report).__name__} before its latents")
    raise StageContractError(f"{method} ended without its latents")


def encode_source(actor, model: str, source) -> tuple:
    """A ref to a source's (kinds/img2img.py's Source) SourceLatents, encoded by a VAE replica, and a marker that
    resolves when the call has ended."""
    return tuple(
        actor.encode_source.options(num_returns=2).remote(model, source.image, source.width, source.height, source.mask)
    )


async def decode(actor, model: str, latents, specs: Sequence, target: S3Target | None = None,
                 keys: Sequence[str] | None = None) -> list:  # fmt: skip
    """PNGs of the first len(specs) images of `latents`, in order: their bytes, or with an object store
    `target`, the StoredImage of each, put there under its key by the replica."""
    pngs = await actor.decode.remote(model, latents, list(specs), target, None if keys is None else list(keys))
    _expect("decode", pngs, len(specs))
    for png in pngs:
        _expect_kind("decode", png, target)
    return pngs


def _expect_kind(method: str, png, target: S3Target | None) -> None:
    """With an object store the scheduler must never receive image bytes; without one it needs them."""
    expected = bytes if target is None else StoredImage
    if not isinstance(png, expected):
        raise StageContractError(f"{method} returned a {type(png).__name__} where a {expected.__name__} was due")


async def decode_apart(actor, model: str, latents, specs: Sequence) -> tuple[list, list[str]]:
    """Each PNG as an object of its own (refs, never pulled here), and their SHA-256 digests."""
    *pngs, digests = actor.decode_apart.options(num_returns=len(specs) + 1).remote(model, latents, list(specs))
    digests = await digests
    _expect("decode_apart", digests, len(specs))
    return pngs, digests


async def tiled_decode_image(
    next_actor: Callable[[], object], model: str, info: ModelInfo, latents, item: int, spec, core: int, halo: int,
    target: S3Target | None = None, key: str | None = None,
):  # fmt: skip
    """One image (item `item` of `latents`) decoded in tiles spread over the VAE replicas `next_actor` hands
    out: its PNG bytes, or with an object store `target`, its StoredImage under `key`."""
    tiles = plan_tiles(spec.height // info.vae_scale_factor, spec.width // info.vae_scale_factor, core, halo)

    async def prepare():
        *states, sums = next_actor().tiled_prepare.options(num_returns=len(tiles) + 1).remote(
            model, latents, item, tiles
        )
        return states, await sums

    def segment(index: int, number: int, state, sums: np.ndarray):
        return next_actor().tiled_segment.options(num_returns=2).remote(model, index, tiles[number], state, sums)

    states = await tiled_decode.drive(info.decode_segments, prepare, segment)
    png = await next_actor().tiled_assemble.remote(tiles, spec, target, key, *states)
    _expect_kind("tiled_assemble", png, target)
    return png


def upscale(actor, model: str, image, spec, embeds: Sequence):
    """The final latents ref of one image upscaled on one replica."""
    return actor.upscale.remote(model, image, spec, *embeds)


def upscale_parts(actors: Sequence, model: str, image, spec, embeds: Sequence, exchange, session: str) -> list:
    """Every party's share of one image's windows, one per replica; returns (rank 0's latents ref, end markers).

    A replica runs one call at a time, in the order submitted; the parts of an image are all submitted
    here, with no await in between, so every replica runs the parts of spread images in the same order
    and two spread images never wait on each other.
    """
    parts = [
        actor.upscale_part.options(num_returns=2).remote(
            model, image, spec, *embeds, spread=stages.Spread(exchange, session, rank, len(actors))
        )
        for rank, actor in enumerate(actors)
    ]
    return parts[0][0], [asyncio.ensure_future(end) for _, end in parts]
