"""Rater bearer tokens: the shared auth module (`flywheel.runtime.auth`) as the preference service uses it.

Scopes here: `rater` may submit events (only as itself) and read consensus; `admin` may also export
datasets. Kept as an import path for the preference service and its callers.
"""

from flywheel.runtime.auth import (
    SCOPE_ADMIN,
    SCOPE_RATER,
    SCOPES,
    TOKEN_PREFIX,
    Authenticator,
    Principal,
    TokenInfo,
    TokenStore,
    bearer_token,
    hash_token,
)

__all__ = ["SCOPES", "SCOPE_ADMIN", "SCOPE_RATER", "TOKEN_PREFIX", "Authenticator", "Principal", "TokenInfo",
           "TokenStore", "bearer_token", "hash_token"]
