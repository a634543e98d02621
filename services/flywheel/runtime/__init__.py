"""The shared service runtime: config, errors, interceptors, metrics, server lifecycle."""

from flywheel.runtime.config import ServiceSettings
from flywheel.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FlywheelError,
    InvalidArgument,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    require,
)
from flywheel.runtime.server import ServiceRuntime

__all__ = [
    "DeadlineExceeded",
    "FailedPrecondition",
    "FlywheelError",
    "InvalidArgument",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PermissionDenied",
    "ServiceRuntime",
    "ServiceSettings",
    "Unauthenticated",
    "require",
]
