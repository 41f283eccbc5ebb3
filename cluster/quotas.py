"""Admission: whether a new job fits the farm's limit and its owner's quotas. Over one, the job is
refused (RESOURCE_EXHAUSTED) with a message naming the limit and when it frees up."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from renderfarm.cluster.config import LimitsConfig
from renderfarm.cluster.constants import DAY_S
from renderfarm.cluster.jobs import JobStore
from renderfarm.cluster.keys import User


@dataclass(frozen=True)
class Refusal:
    limit: str
    message: str


def refusal(limits: LimitsConfig, user: User, jobs: JobStore, images: int, now: float) -> Refusal | None:
    """Why a job of `images` images by `user` cannot be admitted at `now` (epoch seconds); None if it can."""
    unfinished = jobs.unfinished()
    if len(unfinished) >= limits.max_concurrent_jobs:
        return Refusal("max_concurrent_jobs", (
            f"{_jobs(len(unfinished))} {'is' if len(unfinished) == 1 else 'are'} queued or running, the farm's limit "
            f"(max_concurrent_jobs = {limits.max_concurrent_jobs}); submit again when one ends"
        ))  # fmt: skip
    if user.max_concurrent_jobs is not None:
        own = sum(job.owner == user.name for job in unfinished)
        if own >= user.max_concurrent_jobs:
            return Refusal("max_concurrent_jobs", (
                f"{user.name} has {_jobs(own)} queued or running, their quota "
                f"(max_concurrent_jobs = {user.max_concurrent_jobs}); one frees up when one of them ends"
            ))  # fmt: skip
    if user.max_images_per_day is not None:
        return _daily(user, jobs, images, now)
    return None


def _daily(user: User, jobs: JobStore, images: int, now: float) -> Refusal | None:
    quota = user.max_images_per_day
    if images > quota:
        return Refusal("max_images_per_day", (
            f"a job of {images} images is more than {user.name}'s whole quota "
            f"(max_images_per_day = {quota}); split it into smaller jobs"
        ))  # fmt: skip
    recent = sorted((job.created_at, job.total) for job in jobs.owned_by(user.name) if job.created_at > now - DAY_S)
    used = sum(total for _, total in recent)
    if used + images <= quota:
        return None
    # The window frees images as the oldest jobs in it pass 24 h: the job fits once enough have.
    left = used
    for created_at, total in recent:
        left -= total
        if left + images <= quota:
            # Rounded up to the second shown, so that a job sent at the time the message names fits.
            frees_at = math.ceil(created_at + DAY_S)
            break
    wait = frees_at - now
    return Refusal("max_images_per_day", (
        f"{user.name} submitted {used} images in the last 24 h; {images} more would pass their quota "
        f"(max_images_per_day = {quota}). Room for them frees up at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(frees_at))}, in {wait // 3600:.0f} h {wait % 3600 // 60:.0f} min"
    ))  # fmt: skip


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"
