"""The exact parameters of one image, and how they travel inside its PNG.

Every result PNG carries two text chunks: ``parameters`` in AUTOMATIC1111's
format (so existing tools read it) and ``renderfarm`` holding the spec as JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class ImageSpec:
    """Everything an image is a function of (DESIGN.md invariant 1)."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> ImageSpec:
        return cls(**json.loads(text))

    @property
    def file_name(self) -> str:
        """Deterministic from the spec, so a re-rendered image overwrites itself."""
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:12]
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "image"
        return f"{slug}-{self.seed}-{digest}.png"

    def a1111_parameters(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        sampler = SCHEDULER_LABELS.get(self.scheduler, self.scheduler)
        lines.append(
            f"Steps: {self.steps}, Sampler: {sampler}, CFG scale: {self.guidance_scale:g}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {self.model}"
        )
        return "\n".join(lines)


def encode_png(image: Image.Image, spec: ImageSpec) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_CHUNK, spec.a1111_parameters())
    info.add_itxt(SPEC_CHUNK, spec.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_spec(png: str | Path | bytes) -> ImageSpec:
    """The spec embedded in a result PNG (a path or the file's bytes)."""
    source = io.BytesIO(png) if isinstance(png, bytes) else png
    with Image.open(source) as image:
        text = image.text.get(SPEC_CHUNK)
    if text is None:
        raise ValueError(f"{png if not isinstance(png, bytes) else 'PNG'} carries no renderfarm spec")
    return ImageSpec.from_json(text)


def manifest_line(name: str, spec: ImageSpec) -> str:
    """One manifest.jsonl line: the file name and its spec."""
    return json.dumps({"file": name, "spec": asdict(spec)}, sort_keys=True, ensure_ascii=False) + "\n"
