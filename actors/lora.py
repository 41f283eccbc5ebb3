"""LoRA files: checked and hashed at submission, loaded into a replica's components as PEFT adapters.

A job names each LoRA by (path, sha256, scale). The scheduler takes the digest with `lora_digest`
when the job is submitted; a replica's `Adapters` loads each file once, through diffusers' own LoRA
loaders, and activates the set a batch asks for, so its images equal StableDiffusionPipeline's with
`load_lora_weights` + `set_adapters`.

Only `Adapters` imports torch and diffusers: the scheduler checks files without them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Adapters one model keeps loaded on a replica; the least recently used beyond this are deleted.
# A job may name at most this many LoRAs, since they are all loaded at once.
ADAPTERS_PER_MODEL = 8
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})
# safetensors' own limit on the JSON header; a larger length prefix means the file is not safetensors.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Read size when hashing: large enough to keep a 200 MB file to a few hundred reads.
HASH_CHUNK_BYTES = 1024 * 1024
# Digests of this many (path, size, mtime) file versions are remembered, so a resubmitted sweep is not rehashed.
DIGEST_CACHE_SIZE = 256
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Hex digits of the SHA-256 that name an adapter: 64 bits tell a replica's few adapters apart.
ADAPTER_NAME_CHARS = 16
# Key prefixes of kohya-ss (A1111) LoRA files, by the pipeline component they load into. diffusers
# converts a file only when every key has one of them.
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# diffusers' own format prefixes each key with the component's pipeline name.
COMPONENTS = frozenset({"unet", "text_encoder", "text_encoder_2"})
# diffusers drops DoRA magnitude keys with a warning rather than refusing the file.
DORA_SCALE = "dora_scale"


class LoraFileError(ValueError):
    """A LoRA file the farm will not load: fix or replace the file and submit again."""


@dataclass(frozen=True)
class LoraFile:
    sha256: str
    # The pipeline components the file has weights for, e.g. {"unet", "text_encoder"}.
    components: frozenset[str]


def lora_digest(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a LoRA file the farm accepts; raises LoraFileError (a ValueError) if it is not one."""
    return inspect_lora(path).sha256


def inspect_lora(path: str | os.PathLike) -> LoraFile:
    """The file's digest and the components it has weights for, read from its header without loading tensors.

    Raises LoraFileError (a ValueError) naming the path for a missing or unreadable file, a file that
    is not .safetensors, a header that does not parse, or a file with no LoRA weights.
    """
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"LoRA {path} is a {suffix} file: LoRA files are safetensors only: pickle files can run code when "
            "loaded. Convert it to .safetensors"
        )
    if suffix != SAFETENSORS_SUFFIX:
        raise LoraFileError(f"LoRA {path} is not a {SAFETENSORS_SUFFIX} file; LoRA files are safetensors only")
    try:
        resolved = Path(path).resolve(strict=True)
        file_stat = resolved.stat()
    except OSError as error:
        raise LoraFileError(f"LoRA {path} cannot be read: {error.strerror or error}") from error
    if not stat.S_ISREG(file_stat.st_mode):
        raise LoraFileError(f"LoRA {path} is not a file")
    return _inspect(str(resolved), file_stat.st_size, file_stat.st_mtime_ns)


@lru_cache(maxsize=DIGEST_CACHE_SIZE)
def _inspect(resolved: str, size: int, mtime_ns: int) -> LoraFile:
    """Keyed by size and mtime as well as the path, so a file rewritten in place is read again."""
    try:
        with open(resolved, "rb") as file:
            keys = _tensor_names(resolved, _read_header(resolved, file, size))
            components = _components(resolved, keys)
            file.seek(0)
            digest = hashlib.sha256()
            while chunk := file.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise LoraFileError(f"LoRA {resolved} cannot be read: {error.strerror or error}") from error
    return LoraFile(sha256=digest.hexdigest(), components=components)


def _read_header(path: str, file: IO[bytes], size: int) -> dict:
    """The safetensors JSON header: an 8-byte little-endian length, then that many bytes of JSON.

    Checked as far as the tensors' byte ranges, which must exactly cover the rest of the file.
    """
    not_safetensors = f"LoRA {path} is not a valid safetensors file"
    prefix = file.read(8)
    if len(prefix) < 8:
        raise LoraFileError(f"{not_safetensors}: it is only {size} bytes long")
    header_size = int.from_bytes(prefix, "little")
    if header_size > min(MAX_HEADER_BYTES, size - 8):
        raise LoraFileError(f"{not_safetensors}: its header length ({header_size} bytes) does not fit the file")
    try:
        header = json.loads(file.read(header_size))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraFileError(f"{not_safetensors}: its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise LoraFileError(f"{not_safetensors}: its header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise LoraFileError(f"{not_safetensors}: tensor {name!r} has no data_offsets")
        data_end = max(data_end, offsets[1])
    if 8 + header_size + data_end != size:
        raise LoraFileError(
            f"{not_safetensors}: its tensors end at byte {8 + header_size + data_end} but the file has {size} "
            "(truncated or padded)"
        )
    return header


def _tensor_names(path: str, header: dict) -> list[str]:
    names = [name for name in header if name != "__metadata__"]
    if not any("lora" in name for name in names):
        raise LoraFileError(f"LoRA {path} has no LoRA weights (no tensor name contains 'lora')")
    others = [name for name in names if "lora" not in name and DORA_SCALE not in name]
    if others:
        raise LoraFileError(
            f"LoRA {path} has {len(others)} tensors that are not LoRA weights (names without 'lora'), "
            f"e.g. {others[0]!r}"
        )
    return names


def _components(path: str, names: Sequence[str]) -> frozenset[str]:
    """The components diffusers' Stable Diffusion loaders would load these tensors into."""
    kohya = [next((c for p, c in KOHYA_PREFIXES.items() if name.startswith(p)), None) for name in names]
    if all(kohya):
        components = frozenset(kohya)
    else:
        components = frozenset(name.split(".", 1)[0] for name in names) & COMPONENTS
    if not components:
        raise LoraFileError(
            f"LoRA {path} has no weights for a Stable Diffusion UNet or text encoder: its tensor names start "
            f"with none of {sorted(COMPONENTS)} (diffusers' format) or {sorted(KOHYA_PREFIXES)} (kohya-ss)"
        )
    return components


@dataclass(frozen=True)
class _Loaded:
    name: str
    # The replica's components the adapter was loaded into; empty when the file has no weights for them.
    components: frozenset[str]


class Adapters:
    """The LoRA adapters loaded into one model's components on a replica, and which of them are active.

    `components` are the replica's models by their pipeline names: {"unet": unet} on a denoiser,
    {"text_encoder": ...} (and "text_encoder_2" for SDXL) on a text-encoder replica. Not thread-safe:
    the caller runs `apply` and the forward passes it is for one batch at a time.
    """

    def __init__(self, pipeline_class_name: str, components: Mapping[str, torch.nn.Module]):
        self._loader = _lora_loader(pipeline_class_name)
        unknown = sorted(set(components) - set(self._loader._lora_loadable_modules))
        if unknown:
            raise ValueError(
                f"{pipeline_class_name} loads LoRA into {self._loader._lora_loadable_modules} only, not {unknown}"
            )
        self._components = dict(components)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # by sha256, least recently used first

    @property
    def loaded(self) -> tuple[str, ...]:
        """The SHA-256s of the loaded adapters, least recently used first."""
        return tuple(self._loaded)

    def apply(self, loras: Sequence[tuple[str, str, float]]) -> None:
        """Make exactly these (path, sha256, scale) LoRAs active at these scales, loading any not yet loaded.

        Scale-0 entries are dropped, and with none left every component runs as the base model,
        bit for bit. The same file at two paths is one adapter (their scales add). Raises
        LoraFileError (a ValueError) if a file cannot be read or no longer has the given SHA-256, and
        ValueError for a malformed entry or more than ADAPTERS_PER_MODEL LoRAs. After an error the
        components' active adapters are undefined until the next successful apply.
        """
        wanted = _scales_by_digest(loras)
        for sha256, (path, _) in wanted.items():
            if sha256 in self._loaded:
                self._loaded.move_to_end(sha256)
                continue
            while len(self._loaded) >= ADAPTERS_PER_MODEL:
                self._evict(next(s for s in self._loaded if s not in wanted))
            self._loaded[sha256] = self._load(path, sha256)
        self._activate({sha256: scale for sha256, (_, scale) in wanted.items()})

    def _load(self, path: str, sha256: str) -> _Loaded:
        import safetensors.torch
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise LoraFileError(f"LoRA {path} cannot be read: {error.strerror or error}") from error
        # Hash the very bytes that are loaded, so a file replaced after submission cannot slip in.
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise LoraFileError(
                f"LoRA {path} has changed since the job was submitted (SHA-256 {actual}, not {sha256}); "
                "submit the job again"
            )
        header = _read_header(path, io.BytesIO(data), len(data))
        raw_metadata = (header.get("__metadata__") or {}).get(LORA_ADAPTER_METADATA_KEY)
        # What diffusers' _fetch_state_dict reads from a file, taken from these bytes instead: never a pickle.
        metadata = json.loads(raw_metadata) if raw_metadata else None
        unet = self._components.get("unet")
        # The SDXL pipeline passes its UNet's config to map SGM-named (original SDXL) blocks; SD's does not.
        sdxl = issubclass(self._loader, StableDiffusionXLLoraLoaderMixin)
        unet_config = unet.config if unet is not None and sdxl else None
        state_dict, network_alphas = self._loader.lora_state_dict(safetensors.torch.load(data), unet_config=unet_config)
        if not all("lora" in key for key in state_dict):
            raise LoraFileError(f"LoRA {path} has tensors diffusers cannot load as LoRA weights")

        name = f"lora_{sha256[:ADAPTER_NAME_CHARS]}"
        loaded = []
        try:
            for component, model in self._components.items():
                if not any(key.startswith(f"{component}.") for key in state_dict):
                    continue
                # low_cpu_mem_usage skips initialising LoRA weights the state dict then overwrites.
                if component == "unet":
                    self._loader.load_lora_into_unet(
                        state_dict,
                        network_alphas,
                        unet=model,
                        adapter_name=name,
                        metadata=metadata,
                        low_cpu_mem_usage=True,
                    )
                else:
                    self._loader.load_lora_into_text_encoder(
                        state_dict,
                        network_alphas,
                        text_encoder=model,
                        prefix=component,
                        adapter_name=name,
                        metadata=metadata,
                        low_cpu_mem_usage=True,
                    )
                loaded.append(component)
        except BaseException:
            # A half-loaded adapter would make the next try fail on its name being taken.
            self._delete(_Loaded(name, frozenset(loaded)))
            raise
        return _Loaded(name, frozenset(loaded))

    def _evict(self, sha256: str) -> None:
        self._delete(self._loaded.pop(sha256))

    def _delete(self, adapter: _Loaded) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        for component in adapter.components:
            model = self._components[component]
            if component == "unet":
                model.delete_adapters(adapter.name)
            else:
                delete_adapter_layers(model, adapter.name)

    def _activate(self, scales: Mapping[str, float]) -> None:
        """What StableDiffusionPipeline.set_adapters does, per component and with only its own adapters."""
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder
        from diffusers.utils.peft_utils import set_adapter_layers

        for component, model in self._components.items():
            active = [
                (self._loaded[sha256].name, scale)
                for sha256, scale in scales.items()
                if component in self._loaded[sha256].components
            ]
            if not active:
                # A disabled PEFT layer runs only its base layer, so the output is the base model's exactly.
                set_adapter_layers(model, enabled=False)
                continue
            names, weights = [name for name, _ in active], [scale for _, scale in active]
            if component == "unet":
                model.set_adapters(names, weights)
            else:
                set_adapters_for_text_encoder(names, model, weights)
            set_adapter_layers(model, enabled=True)


def _scales_by_digest(loras: Sequence[tuple[str, str, float]]) -> dict[str, tuple[str, float]]:
    """(path, scale) by sha256 in the order given, the scales of one file added, and scale-0 entries dropped."""
    summed: dict[str, tuple[str, float]] = {}
    for path, sha256, scale in loras:
        sha256 = sha256.lower()
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"LoRA {path}: {sha256!r} is not a SHA-256 hex digest")
        if not math.isfinite(scale):
            raise ValueError(f"LoRA {path}: scale {scale} is not a finite number")
        _, earlier = summed.get(sha256, (path, 0.0))
        summed[sha256] = (path, earlier + scale)
    wanted = {sha256: entry for sha256, entry in summed.items() if entry[1] != 0}
    if len(wanted) > ADAPTERS_PER_MODEL:
        raise ValueError(f"{len(wanted)} LoRAs are named, but a job may use at most {ADAPTERS_PER_MODEL}")
    return wanted


def _lora_loader(pipeline_class_name: str) -> type:
    """The diffusers LoRA loader mixin of a Stable Diffusion 1.x/2.x or SDXL pipeline class."""
    import diffusers
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    pipeline_class = getattr(diffusers, pipeline_class_name, None)
    for loader in (StableDiffusionXLLoraLoaderMixin, StableDiffusionLoraLoaderMixin):
        if isinstance(pipeline_class, type) and issubclass(pipeline_class, loader):
            return loader
    raise ValueError(f"LoRA adapters load into Stable Diffusion and SDXL pipelines, not {pipeline_class_name!r}")
