"""Batching across jobs: 16 one-image jobs submitted together against one 16-image job, same farm.

A farm that batches only within a job runs the 16 one-image jobs as 16 denoiser batches of one;
one that batches across jobs runs them about as fast as the single 16-image job. On one embedded
farm (one denoiser, max batch 16, builtin:tiny-sd), each round times, from the first submission
to the end of the last job:

- 16 jobs `client.sweep(PROMPT, seeds=s)`, submitted back-to-back, then waited for;
- one job `client.sweep(PROMPT, seeds=range(16))`.

    python bench/cross_job.py [--jobs 16] [--size 64] [--steps 4] [--repeats 5]

Prints the median time of each, their ratio (the goal: at most 1.3), and the denoiser batches
each run used (`Farm.stats()`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import renderfarm as rf
from renderfarm.cluster.config import FarmConfig, PoolConfig
from renderfarm.cluster.embedded import EmbeddedFarm

PROMPT = "a red fox"
GOAL = 1.3


def denoiser_batches(farm: EmbeddedFarm) -> Counter:
    """The denoiser's batches so far, by their number of real images."""
    return Counter(farm.farm.stats().stages["denoiser"].batch_sizes)


def describe(before: Counter, after: Counter) -> str:
    sizes = after - before
    return f"{sum(sizes.values())} (sizes {', '.join(f'{size}x{count}' for size, count in sorted(sizes.items())) or '-'})"


def timed(farm: EmbeddedFarm, run) -> tuple[float, str]:
    before = denoiser_batches(farm)
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return seconds, describe(before, denoiser_batches(farm))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16, help="one-image jobs, and images of the single job")
    parser.add_argument("--model", default="builtin:tiny-sd")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    settings = dict(steps=args.steps, width=args.size, height=args.size, model=args.model)
    n = args.jobs

    with tempfile.TemporaryDirectory() as scratch:
        config = FarmConfig(
            output_dir=Path(scratch) / "output",
            model_cache_dir=Path(scratch) / "models",
            state_dir=Path(scratch) / "state",
            port=0,
            metrics_port=None,
            web_port=None,
            max_batch=args.max_batch,
            denoisers=PoolConfig(replicas=1),
        )
        with EmbeddedFarm(config) as farm, rf.Client(farm.address) as client:
            # Fresh seeds for every run, so no run repeats another's images.
            rounds = iter(range(1, 10**6))

            def separate() -> None:
                base = next(rounds) * n
                jobs = [client.sweep(PROMPT, seeds=base + i, **settings) for i in range(n)]
                for job in jobs:
                    job.wait()

            def single() -> None:
                base = next(rounds) * n
                client.sweep(PROMPT, seeds=range(base, base + n), **settings).wait()

            # Warm-up: model loading, the prompt's encoding, both submission patterns.
            single()
            separate()
            runs: dict[str, list[tuple[float, str]]] = {"separate": [], "single": []}
            for _ in range(args.repeats):
                runs["separate"].append(timed(farm, separate))
                runs["single"].append(timed(farm, single))

    separate_s = statistics.median(seconds for seconds, _ in runs["separate"])
    single_s = statistics.median(seconds for seconds, _ in runs["single"])
    ratio = separate_s / single_s
    print(f"cross-job batching: {args.model}, {args.size}x{args.size}, {args.steps} steps, max batch "
          f"{args.max_batch}, 1 denoiser, median of {args.repeats}")  # fmt: skip
    print(f"{n} one-image jobs : {separate_s:7.2f} s")
    print(f"one {n}-image job  : {single_s:7.2f} s")
    print(f"ratio {n} jobs / 1 job: {ratio:.2f}x (goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})")
    print(f"cost of one more job: {(separate_s - single_s) / (n - 1) * 1000:.1f} ms" if n > 1 else "")
    print("denoiser batches per run:")
    for name, label in (("separate", f"{n} jobs"), ("single", "1 job")):
        for index, (seconds, batches) in enumerate(runs[name], 1):
            print(f"  {label:<8} run {index}: {seconds:6.2f} s, {batches}")


if __name__ == "__main__":
    main()
