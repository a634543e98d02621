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
from flywheel.runtime.readiness import Readiness
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
    "Readiness",
    "ServiceRuntime",
    "ServiceSettings",
    "Unauthenticated",
    "require",
]
