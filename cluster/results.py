"""The local result store: OUTPUT_DIR/<job id>/<name>.png plus a manifest.jsonl per job.

Names are functions of the spec, so a retried item rewrites an identical file.
The manifest gets a line only for a result the job store recorded for the first
time, and a resumed job's manifest is rewritten from the store's results index,
so it lists every result exactly once whatever crashed where.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from renderfarm.spec import MANIFEST, AnySpec, manifest_line


def _replace_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class LocalResultStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def write(self, job_id: str, results: Iterable[tuple[AnySpec, bytes]]) -> None:
        """Stores each PNG atomically (temp file + rename) under its spec's file name."""
        directory = self.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        for spec, png in results:
            _replace_atomically(directory / spec.file_name, png)

    def add_to_manifest(self, job_id: str, specs: Iterable[AnySpec]) -> None:
        """Appends a line for each newly recorded result (each stored under its spec's file name)."""
        with open(self.job_dir(job_id) / MANIFEST, "a", encoding="utf-8") as manifest:
            manifest.write("".join(manifest_line(spec.file_name, spec) for spec in specs))

    def rewrite_manifest(self, job_id: str, results: Iterable[tuple[str, AnySpec]]) -> None:
        directory = self.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        text = "".join(manifest_line(name, spec) for name, spec in results)
        _replace_atomically(directory / MANIFEST, text.encode())

    def read(self, job_id: str, name: str) -> bytes:
        return (self.job_dir(job_id) / name).read_bytes()
