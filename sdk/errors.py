"""Errors typed by what the caller should do next."""

from __future__ import annotations

import grpc


class RenderfarmError(Exception):
    """Base class of every error the SDK raises.

    ``code`` is the ``grpc.StatusCode`` of the farm's answer; an error the SDK finds itself (an argument it
    refuses before sending) has its class's code, and one no gRPC status stands for (a failed job) has None.
    ``request_id`` is the request id of the submission that failed, the SDK's own where the caller gave none:
    resubmitting with it never creates a second job. None for other calls.
    """

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.request_id = request_id


class InvalidJobError(RenderfarmError, ValueError):
    """The request is wrong (INVALID_ARGUMENT, or ALREADY_EXISTS for a request_id used for another request);
    resubmitting it will not help.

    ``field`` names the offending request field, e.g. ``"sweep.width"``.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str | None = None, **call):
        super().__init__(message, **call)
        self.field = field


class AuthenticationError(RenderfarmError):
    """The farm does not know the call's token, or it carried none (UNAUTHENTICATED): set RENDERFARM_TOKEN."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RenderfarmError):
    """The caller is known but may not do this, e.g. a member listing another user's jobs (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class CapacityError(RenderfarmError):
    """The farm is at a limit, or the caller at a quota (RESOURCE_EXHAUSTED); the message names which and when
    it frees up. Retry later or ask for less."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class JobNotFoundError(RenderfarmError, KeyError):
    """No job has that id, or none the caller may see: another user's job is not found either (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:
        return str(self.args[0])


class FarmUnavailableError(RenderfarmError, ConnectionError):
    """The farm could not be reached (UNAVAILABLE), or did not answer in time (FarmTimeoutError)."""

    code = grpc.StatusCode.UNAVAILABLE


class FarmTimeoutError(FarmUnavailableError, TimeoutError):
    """A call went unanswered for its deadline (DEADLINE_EXCEEDED): the farm is unreachable or overloaded, or
    the call needs a longer ``timeout=``. A TimeoutError too, for code that catches timeouts generically."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class JobFailedError(RenderfarmError):
    """A job ended FAILED; carries the job id and the farm's error."""

    def __init__(self, job_id: str, error: str):
        super().__init__(f"job {job_id} failed: {error}")
        self.job_id = job_id
        self.error = error
