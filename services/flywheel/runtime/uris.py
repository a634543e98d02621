"""Caller-supplied URIs checked before any file or socket is touched: dataset and export locations
from requests, and checkpoint locations announced on the model-versions topic.

Such a URI may name only:
- a local path (plain or `file://`) that resolves, symlinks followed, inside one of the roots the
  operator configured for that field, or
- a remote location whose `scheme://host` the operator listed explicitly (e.g. `s3://datasets`);
  nothing else, so no request makes a service read `/etc/passwd` or connect to an address the
  caller chose.

Malformed input (too long, control characters, an over-long path component, an unknown scheme) is
INVALID_ARGUMENT; a well-formed location outside what the operator allowed is PERMISSION_DENIED.
Both messages name the request field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

from flywheel.runtime.errors import InvalidArgument, PermissionDenied, clip

MAX_URI_CHARS = 1024
# Linux NAME_MAX: a longer component makes every file call fail with ENAMETOOLONG (OSError 36).
MAX_COMPONENT_BYTES = 255


@dataclass(frozen=True)
class UriPolicy:
    """What one request field may point at."""

    field: str
    local_roots: Sequence[Path]
    remote: Sequence[str] = ()  # "scheme://host" entries an operator allowed; host "*" allows any host
    max_chars: int = MAX_URI_CHARS


@dataclass(frozen=True)
class CheckedUri:
    uri: str
    local_path: Path | None  # set for local URIs: the resolved path inside an allowed root


def _under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_uri(uri: str, policy: UriPolicy) -> CheckedUri:
    """Validate `uri` against `policy`; raises InvalidArgument or PermissionDenied naming the field."""
    field = policy.field
    if len(uri) > policy.max_chars:
        raise InvalidArgument(field, f"longer than {policy.max_chars} characters")
    if not uri.isprintable():
        raise InvalidArgument(field, "contains control characters")
    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
    except ValueError as exc:  # e.g. an unbalanced "[" in the host
        raise InvalidArgument(field, f"not a URI: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        # A file:// path is percent-decoded, as `flywheel.checkpoints` does when opening it: checking
        # the encoded text would let "%2E%2E" pass here and become ".." there.
        return _check_local(uri, unquote(parts.path) if scheme == "file" else uri, policy)
    if not parts.netloc:
        raise InvalidArgument(field, f"{clip(uri)!r} is neither a local path nor scheme://host/path")
    allowed = {entry.lower().rstrip("/") for entry in policy.remote}
    if f"{scheme}://{host}" not in allowed and f"{scheme}://*" not in allowed:
        raise PermissionDenied(f"{field}: {scheme}://{clip(host)} is not an allowed location "
                               "(an operator must list it)")
    _check_components(parts.path, field)
    return CheckedUri(uri, None)


def _check_components(path: str, field: str) -> None:
    for component in path.split("/"):
        if len(component.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise InvalidArgument(field, f"a path component is longer than {MAX_COMPONENT_BYTES} bytes")


def _check_local(uri: str, path: str, policy: UriPolicy) -> CheckedUri:
    field = policy.field
    if not path:
        raise InvalidArgument(field, "empty path")
    if "\x00" in path:
        raise InvalidArgument(field, "contains a NUL byte")
    _check_components(path, field)
    if len(path.encode("utf-8", "surrogatepass")) >= 4096:  # PATH_MAX
        raise InvalidArgument(field, "path longer than 4095 bytes")
    resolved = Path(os.path.realpath(os.path.abspath(path)))
    roots = [Path(os.path.realpath(os.path.abspath(r))) for r in policy.local_roots]
    if not any(_under(resolved, root) for root in roots):
        raise PermissionDenied(f"{field}: {clip(uri)!r} is outside the allowed directories "
                               f"({', '.join(clip(str(r)) for r in roots) or 'none configured'})")
    return CheckedUri(uri, resolved)
