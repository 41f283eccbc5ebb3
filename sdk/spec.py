"""The exact parameters of one image, and how they travel inside its PNG.

Every result PNG carries two text chunks: ``parameters`` in AUTOMATIC1111's
format (so existing tools read it) and ``renderfarm`` holding the spec as JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, PngImagePlugin

# Scheduler names the farm accepts, with the sampler label AUTOMATIC1111 shows.
SCHEDULER_LABELS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
}

SPEC_CHUNK = "renderfarm"
PARAMETERS_CHUNK = "parameters"
MANIFEST = "manifest.jsonl"


class _Spec:
    def fields(self) -> dict:
        """The spec as plain data; unset optional fields are left out, so older specs keep their JSON."""
        # vars() rather than dataclasses.asdict, which deep-copies every value: a spec's fields are
        # immutable scalars, or a nested spec.
        return {name: _plain(value) for name, value in vars(self).items() if value is not None}

    def to_json(self) -> str:
        """The spec as canonical JSON (sorted keys): what the PNG's renderfarm chunk holds."""
        return _canonical_json(self)

    @property
    def file_name(self) -> str:
        """Deterministic from the spec, so a re-rendered image overwrites itself."""
        return _file_name(self)

    def _name_stem(self) -> str:
        raise NotImplementedError


def _plain(value):
    if isinstance(value, _Spec):
        return value.fields()
    if isinstance(value, tuple):
        return [_plain(element) for element in value]
    return value


# Specs are frozen and hashable, so their JSON and name are computed once for the many times the farm's
# bookkeeping asks (kept outside the instances, whose vars() stay their fields).
@lru_cache(maxsize=65536)
def _canonical_json(spec: _Spec) -> str:
    return json.dumps(spec.fields(), sort_keys=True, ensure_ascii=False)


@lru_cache(maxsize=65536)
def _file_name(spec: _Spec) -> str:
    digest = hashlib.sha256(spec.to_json().encode()).hexdigest()[:12]
    return f"{spec._name_stem()}-{digest}.png"


@lru_cache(maxsize=4096)
def _slug(prompt: str) -> str:
    """A prompt's part of its images' file names; a sweep has many images per prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"


@dataclass(frozen=True)
class LoraSpec(_Spec):
    """One LoRA adapter an image was rendered with: its file (by path and content) and its scale."""

    path: str
    sha256: str
    scale: float

    @property
    def name(self) -> str:
        """What AUTOMATIC1111 calls it: the file's stem."""
        return Path(self.path).stem


@dataclass(frozen=True)
class ImageSpec(_Spec):
    """Everything a generated image is a function of: the same spec renders the same pixels (README, "The purity
    rule")."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    # The LoRA adapters applied together, in order; None for none (so specs without keep their JSON).
    loras: tuple[LoraSpec, ...] | None = None

    @classmethod
    def from_fields(cls, fields: dict) -> ImageSpec:
        loras = fields.pop("loras", None)
        return cls(**fields, loras=None if loras is None else tuple(LoraSpec(**lora) for lora in loras))

    def _name_stem(self) -> str:
        return f"{_slug(self.prompt)}-{self.seed}"

    def a1111_parameters(self) -> str:
        """The image's settings as AUTOMATIC1111's `parameters` text chunk writes them."""
        return "\n".join(self._a1111_lines())

    def _a1111_lines(self) -> list[str]:
        # AUTOMATIC1111 names a LoRA in the prompt, and its hash in "Lora hashes" (the first 12 hex digits).
        loras = self.loras or ()
        prompt = " ".join([self.prompt, *(f"<lora:{lora.name}:{lora.scale:g}>" for lora in loras)])
        hashes = f'Lora hashes: "{", ".join(f"{lora.name}: {lora.sha256[:12]}" for lora in loras)}"'
        return _rendered_lines(self, prompt, [hashes] if loras else [])


@dataclass(frozen=True)
class DecodedImageSpec(_Spec):
    """Everything a decoded image is a function of: the latents (by hash) and the VAE."""

    model: str
    latents_sha256: str
    width: int
    height: int
    tile: int
    overlap: int

    def _name_stem(self) -> str:
        return f"decoded-{self.latents_sha256[:12]}"

    def a1111_parameters(self) -> str:
        """The image's settings as AUTOMATIC1111's `parameters` text chunk writes them."""
        return f"Decoded latents {self.latents_sha256}, Size: {self.width}x{self.height}, Model: {self.model}"


@dataclass(frozen=True)
class UpscaledImageSpec(_Spec):
    """Everything an upscaled image is a function of: the source image (by hash) and the parameters."""

    model: str
    source_sha256: str
    prompt: str
    negative_prompt: str
    noise_level: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    tile: int
    # The sweep image it was made from, in a sweep with upscale=4; None for an input image.
    source: ImageSpec | None = None

    def _name_stem(self) -> str:
        return f"upscaled-{self.source_sha256[:12]}-{self.seed}"

    def a1111_parameters(self) -> str:
        """The image's settings as AUTOMATIC1111's `parameters` text chunk writes them."""
        if self.source is not None:
            # As AUTOMATIC1111 writes a hires-fixed image: the first pass, then the upscale.
            *lines, first_pass = self.source._a1111_lines()
            lines.append(
                f"{first_pass}, Hires upscale: {self.width // self.source.width}, Hires resize: "
                f"{self.width}x{self.height}, Hires steps: {self.steps}, Hires upscaler: {self.model}, "
                f"Hires CFG scale: {self.guidance_scale:g}, Noise level: {self.noise_level}"
            )
            return "\n".join(lines)
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, CFG scale: {self.guidance_scale:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Noise level: {self.noise_level}, Model: {self.model}"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class EditedImageSpec(_Spec):
    """Everything an img2img or inpainted image is a function of: the source image (and mask) by hash, and
    the parameters."""

    model: str
    source_sha256: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    strength: float
    # Inpainting: the mask's encoded bytes, hashed; None for img2img.
    mask_sha256: str | None = None

    def _name_stem(self) -> str:
        kind = "img2img" if self.mask_sha256 is None else "inpaint"
        return f"{kind}-{self.source_sha256[:12]}-{_slug(self.prompt)}-{self.seed}"

    def a1111_parameters(self) -> str:
        """The image's settings as AUTOMATIC1111's `parameters` text chunk writes them."""
        # As AUTOMATIC1111 writes an img2img image: its denoising strength after the model.
        return "\n".join(_rendered_lines(self, self.prompt, [f"Denoising strength: {self.strength:g}"]))


AnySpec = ImageSpec | DecodedImageSpec | UpscaledImageSpec | EditedImageSpec


def _rendered_lines(spec: ImageSpec | EditedImageSpec, prompt: str, extras: list[str]) -> list[str]:
    """AUTOMATIC1111's `parameters` text of a rendered image: the prompt, the negative prompt, then the settings."""
    lines = [prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    sampler = SCHEDULER_LABELS.get(spec.scheduler, spec.scheduler)
    settings = [
        f"Steps: {spec.steps}", f"Sampler: {sampler}", f"CFG scale: {spec.guidance_scale:g}", f"Seed: {spec.seed}",
        f"Size: {spec.width}x{spec.height}", f"Model: {spec.model}", *extras,
    ]  # fmt: skip
    lines.append(", ".join(settings))
    return lines


def guided(guidance_scale: float) -> bool:
    """Whether an image runs classifier-free guidance: the diffusers pipelines skip the unconditional pass
    (and the negative prompt) at guidance_scale <= 1. Guided and unguided images never share a batch."""
    return guidance_scale > 1


def spec_from_json(text: str) -> AnySpec:
    fields = json.loads(text)
    if "strength" in fields:
        return EditedImageSpec(**fields)
    if "latents_sha256" in fields:
        return DecodedImageSpec(**fields)
    if "source_sha256" in fields:
        source = fields.pop("source", None)
        return UpscaledImageSpec(**fields, source=None if source is None else ImageSpec.from_fields(source))
    return ImageSpec.from_fields(fields)


def encode_png(image: Image.Image, spec: AnySpec) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_CHUNK, spec.a1111_parameters())
    info.add_itxt(SPEC_CHUNK, spec.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_spec(png: str | Path | bytes) -> AnySpec:
    """The spec embedded in a result PNG (a path or the file's bytes)."""
    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as image:
        text = image.text.get(SPEC_CHUNK)
    if text is None:
        raise ValueError(f"{png if not isinstance(png, bytes) else 'PNG'} carries no renderfarm spec")
    return spec_from_json(text)


def manifest_line(name: str, spec: AnySpec) -> str:
    """One manifest.jsonl line: the file name and its spec."""
    # What json.dumps({"file": name, "spec": spec.fields()}, sort_keys=True, ensure_ascii=False) writes,
    # reusing the spec's canonical JSON ("file" sorts before "spec").
    return f'{{"file": {json.dumps(name, ensure_ascii=False)}, "spec": {spec.to_json()}}}\n'
