"""`bench/gpu.py --smoke`, the GPU benchmark on a CPU with tiny models: it runs (its own farm, on its own local
Ray) and writes its table, every row with positive numbers."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "gpu.py"
MODELS = ("tiny-sd 64x64, 2 steps, CFG", "tiny-sdxl 64x64, 2 steps, CFG")
# (run, batch) of each model's rows: --smoke runs one farm.
RUNS = (("diffusers", "1"), ("diffusers", "8"), ("renderfarm", "max 8"))


def cells(table: str) -> list[list[str]]:
    """The markdown table rows' cells, headers and rules left out."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")
    ]
    return [row for row in rows if row[0] not in ("model", "tiled decode") and not row[0].startswith("---")]


def test_the_smoke_run_writes_every_row_with_positive_numbers(tmp_path, model_cache_dir):
    out = tmp_path / "table.md"
    bench = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out), "--cache", str(model_cache_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-4000:]
    table = out.read_text()
    assert bench.stdout == table

    rows = cells(table)
    sweeps = {(model, run, batch): numbers for model, run, batch, *numbers in rows if model in MODELS}
    assert sweeps.keys() == {(model, run, batch) for model in MODELS for run, batch in RUNS}
    for row, (images_per_s, versus_best, tflop_per_s, *_) in sweeps.items():
        assert float(images_per_s) > 0 and float(versus_best) > 0 and float(tflop_per_s) > 0, row
    decodes = {name: float(seconds) for name, seconds, *_ in rows if name not in MODELS}
    assert decodes.keys() == {"diffusers enable_tiling", "renderfarm, 1 VAE replica"}
    assert all(seconds > 0 for seconds in decodes.values())
