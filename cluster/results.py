"""The local result store: OUTPUT_DIR/<job id>/<name>.png plus a manifest.jsonl per job."""

from __future__ import annotations

import os
from pathlib import Path

from renderfarm.spec import MANIFEST, ImageSpec, manifest_line


class LocalResultStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def write(self, job_id: str, spec: ImageSpec, png: bytes) -> str:
        """Stores one result atomically (temp file + rename); returns its file name."""
        directory = self.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        name = spec.file_name
        temporary = directory / f".{name}.tmp"
        temporary.write_bytes(png)
        os.replace(temporary, directory / name)
        with open(directory / MANIFEST, "a", encoding="utf-8") as manifest:
            manifest.write(manifest_line(name, spec))
        return name

    def read(self, job_id: str, name: str) -> bytes:
        return (self.job_dir(job_id) / name).read_bytes()
