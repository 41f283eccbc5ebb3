"""Builtin models generated in code from a fixed seed, so the farm runs without downloaded weights."""

import contextlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

END_OF_WORD = "</w>"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

# Words the tiny tokenizer learns its BPE merges from: everyday English plus prompt vocabulary.
MERGE_CORPUS = """
a an the of and or in on at to with by from for under over near into through is are this that
photo photograph painting portrait landscape illustration drawing sketch render poster closeup
red orange yellow green blue purple pink white black gray brown golden silver dark bright pale
fox cat dog horse bird owl wolf bear deer rabbit fish dragon lion tiger eagle whale butterfly
lighthouse castle house city street forest mountain river lake ocean sea beach harbor cliff
sky cloud sunset sunrise night moon star sun rain snow storm fog winter summer autumn spring
tree flower garden field meadow desert island village bridge tower temple ruins road window
man woman child girl boy person astronaut knight robot wizard king queen sailor painter
beautiful detailed dramatic soft cinematic realistic surreal ancient futuristic cozy quiet
light lighting shadow color colorful style art digital oil watercolor pencil ink canvas
highly intricate trending masterpiece quality sharp focus wide angle lens camera studio
standing sitting flying running walking glowing shining floating burning frozen
"""
NUM_MERGES = 400

# tiny-sd's and tiny-sdxl's VAE (SD 1.x and SDXL share the layout): four levels, so 16x16 latents are 128x128 pixels.
TINY_VAE = dict(
    sample_size=128,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 32, 32, 32),
    norm_num_groups=8,
)


# tiny-sd's UNet layout, which tiny-sd-inpaint shares.
TINY_SD_UNET = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def build_tiny_sd(dest: Path) -> None:
    """Save a small random-weight Stable Diffusion 1.x pipeline to `dest` in diffusers layout."""
    _build_sd(dest, unet=TINY_SD_UNET, vae=TINY_VAE)


def build_tiny_sd_inpaint(dest: Path) -> None:
    """Save tiny-sd's layout with an inpainting UNet (9 input channels) as a StableDiffusionInpaintPipeline."""
    _build_sd(dest, unet=TINY_SD_UNET, vae=TINY_VAE, inpaint=True)


def build_null_sd(dest: Path) -> None:
    """The smallest Stable Diffusion 1.x architecture: a one-level UNet of 8 channels (its mid-block keeps the
    cross-attention) and a one-level VAE, so an 8x8 image is 8x8 latents. It costs next to nothing to run:
    what a benchmark on it measures is the farm's own bookkeeping."""
    _build_sd(
        dest,
        unet=dict(
            sample_size=8,
            block_out_channels=(8,),
            layers_per_block=1,
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            norm_num_groups=4,
            attention_head_dim=8,
        ),
        vae=dict(
            sample_size=8,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(8,),
            norm_num_groups=4,
        ),
    )


def _build_sd(dest: Path, unet: dict, vae: dict, inpaint: bool = False) -> None:
    """An SD 1.x pipeline with builtin:tiny-sd's tokenizer, text encoder and scheduler, and these UNet and VAE
    shapes; an inpainting one if `inpaint`."""
    # Imported here so that listing builtins stays cheap for processes that never build one.
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _build_tokenizer()
    with _seeded_weights():
        # quick_gelu: SD 1.x's text encoder is OpenAI's CLIP.
        text_encoder = _build_text_encoder(tokenizer, hidden_act="quick_gelu")
        # An inpainting UNet takes the noisy latents (4 channels), the mask (1) and the masked image's latents (4).
        in_channels = 9 if inpaint else 4
        unet_model = UNet2DConditionModel(in_channels=in_channels, out_channels=4, cross_attention_dim=32, **unet)
        _rescale_untrained_unet(unet_model)
        vae_model = _build_vae(vae, scaling_factor=0.18215)

    # Stable Diffusion 1.5's scheduler settings, so sampling behaves like the real model's. Its config
    # also lists clip_sample=False, which PNDMScheduler rejects as an argument: it never clips anyway.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipeline = pipeline_class(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet_model,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(dest, safe_serialization=True)


def build_tiny_sdxl(dest: Path) -> None:
    """Save a small random-weight Stable Diffusion XL pipeline to `dest` in diffusers layout."""
    _build_sdxl(
        dest,
        unet=dict(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
        ),
        vae=TINY_VAE,
        text_encoder=dict(hidden_size=32),
        text_encoder_2=dict(hidden_size=32, projection_dim=32),
    )


def _build_sdxl(dest: Path, unet: dict, vae: dict, text_encoder: dict, text_encoder_2: dict) -> None:
    """An SDXL pipeline with builtin:tiny-sd's tokenizer for both encoders and SDXL's scheduler, and these UNet
    and VAE shapes; `text_encoder` and `text_encoder_2` override CLIPTextConfig arguments of tiny-sd's encoder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _build_tokenizer()
    with _seeded_weights():
        # SDXL's first text encoder is OpenAI's CLIP (quick_gelu), its second, with the projection, OpenCLIP's.
        text_encoder_model = _build_text_encoder(tokenizer, hidden_act="quick_gelu", **text_encoder)
        text_encoder_2_model = _build_text_encoder(tokenizer, hidden_act="gelu", with_projection=True, **text_encoder_2)
        time_embed_dim = 8
        unet_model = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            # The UNet attends to both encoders' hidden states, concatenated.
            cross_attention_dim=text_encoder_model.config.hidden_size + text_encoder_2_model.config.hidden_size,
            use_linear_projection=True,
            # SDXL's added conditioning: six size numbers (original size, crop corner, target size), each
            # embedded in time_embed_dim, and the pooled text embedding.
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2_model.config.projection_dim,
            **unet,
        )
        # SDXL attends to the encoders' penultimate hidden states, which no final layer norm scales: about a
        # third of the scale of the states tiny-sd attends to, hence three times its text gain.
        _rescale_untrained_unet(unet_model, text_gain=48)
        # SDXL's VAE overflows in fp16, which its config says with force_upcast.
        vae_model = _build_vae(vae, scaling_factor=0.13025, force_upcast=True)

    # Stable Diffusion XL's scheduler settings.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae_model,
        text_encoder=text_encoder_model,
        text_encoder_2=text_encoder_2_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet_model,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(dest, safe_serialization=True)


def build_tiny_sd_x4_upscaler(dest: Path) -> None:
    """Save a small random-weight stabilityai/stable-diffusion-x4-upscaler to `dest` in diffusers layout."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    tokenizer = _build_tokenizer()
    with _seeded_weights():
        # gelu: SD 2's text encoder is OpenCLIP's.
        text_encoder = _build_text_encoder(tokenizer, hidden_act="gelu")
        # The real UNet's layout, narrower and one level shallower.
        unet = UNet2DConditionModel(
            sample_size=32,
            # 4 latent channels, then the 3 channels of the noised low-resolution image.
            in_channels=7,
            out_channels=4,
            block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            only_cross_attention=(True, True, False),
            attention_head_dim=8,
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size,
            # The noise level added to the low-resolution image is a class label, one embedding per
            # level; class_embed_type stays None, which makes that an nn.Embedding.
            num_class_embeds=1000,
        )
        # Milder than tiny-sd's: stronger gains make the sampling chaotic, so that tiny differences
        # (a tile border) grow over the steps, which a trained upscaler does not do.
        _rescale_untrained_unet(unet, output_gain=1, text_gain=4)
        # Three levels: latents are a quarter of the output's width and height, the input's size.
        # Unlike the real VAE, no attention in the mid-block: it attends over every latent pixel
        # at once (the tiled decoder runs it untiled), 518,400 of them for a 960x540 input, which
        # alone takes ~10 minutes on a CPU thread. tiny-sd's VAE keeps it, and tests it.
        vae = AutoencoderKL(
            mid_block_add_attention=False,
            sample_size=128,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            norm_num_groups=8,
            layers_per_block=1,
            latent_channels=4,
            scaling_factor=0.08333,
        )

    # The real model's scheduler configs: v-prediction DDIM for sampling, and DDPM's linear schedule
    # for the noise added to the low-resolution image.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    low_res_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
    )
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        max_noise_level=350,
    )
    pipeline.save_pretrained(dest, safe_serialization=True)


@contextlib.contextmanager
def _seeded_weights():
    """Model constructors draw their weights from the global RNG: seeded here, and the caller's left untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _build_vae(vae: dict, **settings):
    """An AutoencoderKL of tiny-sd's VAE family, shaped by `vae`; it draws its weights from the global RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, layers_per_block=1, latent_channels=4, **settings, **vae)


def _rescale_untrained_unet(unet, output_gain: float = 3, text_gain: float = 16) -> None:
    """Rescale random UNet weights so sampling responds to the noise and the prompt like a trained model."""
    import torch
    from diffusers.models.attention_processor import Attention

    with torch.no_grad():
        # Untrained, the noise prediction has std ~0.35; a trained model's is ~1.
        unet.conv_out.weight.mul_(output_gain)
        unet.conv_out.bias.mul_(output_gain)
        # Untrained cross-attention averages the text tokens evenly, so prompts barely change the image.
        # Sharper and stronger attention to the text makes different prompts give visibly different images.
        for module in unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                module.to_k.weight.mul_(text_gain)
                module.to_v.weight.mul_(text_gain)


def _build_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tokenizer_files:
        vocab_file, merges_file = _write_bpe_files(Path(tokenizer_files))
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def _build_text_encoder(tokenizer, hidden_act: str, with_projection: bool = False, **config):
    """A small random CLIP text encoder for `tokenizer` (`config` overrides CLIPTextConfig arguments), with a
    projection of its pooled output if asked; it draws its weights from the global RNG."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act=hidden_act,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(CLIPTextConfig(**settings | config))


def _write_bpe_files(directory: Path) -> tuple[Path, Path]:
    """Write a CLIP-style byte-level BPE vocab.json and merges.txt; return their paths."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merges = _learn_merges(MERGE_CORPUS.split(), NUM_MERGES)
    # Same order as CLIP's vocabulary: bytes, bytes ending a word, merged symbols, then the specials.
    tokens = byte_chars + [char + END_OF_WORD for char in byte_chars] + [left + right for left, right in merges]
    tokens += [START_TOKEN, END_TOKEN]
    # dict.fromkeys: two different merges may spell the same symbol, which takes one id.
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}

    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )
    return vocab_file, merges_file


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` BPE merges from `words`, deterministically."""
    # Words end with the end-of-word marker on their last symbol, as in CLIP's merges.
    split_words = [tuple(word[:-1]) + (word[-1] + END_OF_WORD,) for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pair_counts = Counter(pair for symbols in split_words for pair in zip(symbols, symbols[1:]))
        if not pair_counts:
            break
        # Most frequent pair first; ties break alphabetically so the result never depends on ordering.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        split_words = [_merge_pair(symbols, best) for symbols in split_words]
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sd-inpaint": build_tiny_sd_inpaint,
    "tiny-sdxl": build_tiny_sdxl,
    "null-sd": build_null_sd,
    "tiny-sd-x4-upscaler": build_tiny_sd_x4_upscaler,
}
# Part of the cache directory name of built models: bump it whenever a recipe changes,
# so that builds made by older code are not reused.
BUILTIN_VERSION = "v2"
