"""Errors typed by what the caller should do next."""

from __future__ import annotations


class RenderfarmError(Exception):
    """Base class of every error the SDK raises."""


class InvalidJobError(RenderfarmError, ValueError):
    """The request is wrong (INVALID_ARGUMENT); resubmitting it will not help.

    ``field`` names the offending request field, e.g. ``"sweep.width"``.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class AuthenticationError(RenderfarmError):
    """The farm does not know the call's token, or it carried none (UNAUTHENTICATED): set RENDERFARM_TOKEN."""


class PermissionDeniedError(RenderfarmError):
    """The caller is known but may not do this, e.g. a member listing another user's jobs (PERMISSION_DENIED)."""


class CapacityError(RenderfarmError):
    """The farm is at a limit, or the caller at a quota (RESOURCE_EXHAUSTED); the message names which and when
    it frees up. Retry later or ask for less."""


class JobNotFoundError(RenderfarmError, KeyError):
    """No job has that id, or none the caller may see: another user's job is not found either (NOT_FOUND)."""

    def __str__(self) -> str:
        return str(self.args[0])


class FarmUnavailableError(RenderfarmError, ConnectionError):
    """The farm could not be reached (UNAVAILABLE or a deadline passed)."""


class JobFailedError(RenderfarmError):
    """A job ended FAILED; carries the job id and the farm's error."""

    def __init__(self, job_id: str, error: str):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error
