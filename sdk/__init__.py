"""renderfarm: render Stable Diffusion sweeps across a farm of GPUs from Python.

    import renderfarm as rf
    job = rf.Client("localhost:50051").sweep(["a red fox"], seeds=range(4))
    for result in job.results():
        result.save("renders/")

This package is the thin SDK: it never imports torch or ray.
"""

from importlib.metadata import version

from renderfarm._wire import JobState, JobStatus, Preview, Progress, Result, StateChange, StepProgress
from renderfarm.aio import AsyncClient, AsyncJob
from renderfarm.client import Client, Job
from renderfarm.errors import (
    AuthenticationError,
    CapacityError,
    FarmTimeoutError,
    FarmUnavailableError,
    InvalidJobError,
    JobFailedError,
    JobNotFoundError,
    PermissionDeniedError,
    RenderfarmError,
)
from renderfarm.grid import Sheet, grids
from renderfarm.spec import ImageSpec, read_spec

__version__ = version("renderfarm")

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "CapacityError",
    "Client",
    "FarmTimeoutError",
    "FarmUnavailableError",
    "ImageSpec",
    "InvalidJobError",
    "Job",
    "JobFailedError",
    "JobNotFoundError",
    "JobState",
    "JobStatus",
    "PermissionDeniedError",
    "Preview",
    "Progress",
    "RenderfarmError",
    "Result",
    "Sheet",
    "StateChange",
    "StepProgress",
    "grids",
    "read_spec",
]
