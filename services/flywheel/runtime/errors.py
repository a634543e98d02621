"""Domain exceptions and the one place that maps them to gRPC status codes.

Service code raises these; `ExceptionMappingInterceptor` turns them into statuses, so no handler
calls `context.abort` for ordinary failures.
"""

from __future__ import annotations

import grpc


class FlywheelError(Exception):
    """Base class; `status_code` is what a gRPC caller sees."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FlywheelError):
    """Bad input. The message always names the offending field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class Overloaded(FlywheelError):
    """A bounded queue is full; the caller should back off and retry."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(FlywheelError):
    """The service is starting, reloading or shutting down."""

    status_code = grpc.StatusCode.UNAVAILABLE


class NotFound(FlywheelError):
    status_code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(FlywheelError):
    status_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FlywheelError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(FlywheelError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(FlywheelError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for `exc`.

    Unexpected exceptions become INTERNAL without leaking internals beyond the exception type.
    """
    if isinstance(exc, FlywheelError):
        return exc.status_code, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def require(condition: bool, field: str, reason: str) -> None:
    """Raise InvalidArgument(field, reason) unless `condition` holds."""
    if not condition:
        raise InvalidArgument(field, reason)
