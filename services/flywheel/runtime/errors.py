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


# Messages often echo the caller's input (an id, a URI). A status message travels in trailing
# metadata, so an unbounded echo of a megabyte id would turn NOT_FOUND into RESOURCE_EXHAUSTED
# ("metadata size exceeds hard limit") on the client. Echoed values are clipped to this many
# characters and the whole message to MAX_MESSAGE_CHARS.
MAX_ECHO_CHARS = 128
MAX_MESSAGE_CHARS = 1024


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` as text of at most about `limit` characters, saying how much was cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller sees for `exc`.

    Unexpected exceptions become INTERNAL without leaking internals beyond the exception type.
    Messages are clipped to MAX_MESSAGE_CHARS whatever input they echo.
    """
    if isinstance(exc, FlywheelError):
        return exc.status_code, clip(str(exc), MAX_MESSAGE_CHARS)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, clip(str(exc) or "not implemented", MAX_MESSAGE_CHARS)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"


def require(condition: bool, field: str, reason: str) -> None:
    """Raise InvalidArgument(field, reason) unless `condition` holds."""
    if not condition:
        raise InvalidArgument(field, reason)
