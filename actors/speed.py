"""How a replica's UNet and VAE run besides their dtype: every attention through torch's
scaled_dot_product_attention (SDPA), and the speed options of its pool (cluster/config.py PoolConfig).

SDPA is diffusers' and transformers' default on torch 2, so their pipelines' pixels are SDPA's: the farm keeps
it on, for parity. The options are off by default because they change pixels (channels-last convolutions round
differently) or may (torch.compile's fused kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

# transformers' name for SDPA, which the CLIP text encoders are loaded with.
TEXT_ENCODER_ATTENTION = "sdpa"


@dataclass(frozen=True)
class Speed:
    """A pool's speed options, as PoolConfig names them."""

    channels_last: bool = False
    compile: str | None = None  # a torch.compile mode

    def apply(self, model: torch.nn.Module, compiled: torch.nn.Module) -> None:
        """Sets every attention of `model` (a UNet or a VAE) to SDPA, then the options: channels-last weights, and
        torch.compile of `compiled` (the model, or the part of it that runs whole). Compiled in place, so that the
        model keeps its class, its config and its LoRA loaders."""
        # Explicit: an Attention built without scale_qk would otherwise fall back to the eager processor.
        model.set_attn_processor(AttnProcessor2_0())
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile is not None:
            compiled.compile(mode=self.compile)
