"""Model version names: `<kind>-<NNNN>` ("policy-0007", "reward-0012"), in one place.

Every service orders, parses and creates version names through these functions; version 0 of a
kind is its base model (the checkpoint the services start from before any training).
"""

from __future__ import annotations

import re

POLICY = "policy"
REWARD = "reward"

_NUMBERED = re.compile(r"-(\d+)$")


def version_name(kind: str, number: int) -> str:
    """('policy', 7) -> 'policy-0007'."""
    return f"{kind}-{number:04d}"


def version_number(version: str) -> int:
    """'policy-0007' -> 7. Raises ValueError for names without a numeric suffix."""
    match = _NUMBERED.search(version or "")
    if not match:
        raise ValueError(f"not a versioned name: {version!r}")
    return int(match.group(1))


def version_order(version: str) -> int:
    """Sort key of any version string: its number, -1 for names without one (e.g. a TGI model sha)."""
    match = _NUMBERED.search(version or "")
    return int(match.group(1)) if match else -1


def next_version(version: str) -> str:
    """'policy-0007' -> 'policy-0008'."""
    kind = _NUMBERED.sub("", version)
    return version_name(kind, version_number(version) + 1)


BASE_POLICY_VERSION = version_name(POLICY, 0)
BASE_REWARD_VERSION = version_name(REWARD, 0)
