"""API keys: one constant-time comparison for every route that checks one, and who a key is."""

from __future__ import annotations

import hashlib
import hmac


def api_key_matches(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``; compares with every key, in constant time, whatever matches."""
    token = given.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization`` header value ``Bearer <key>`` (any case of "Bearer"); None otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    return token if scheme.lower() == "bearer" else None


def key_owner(token: str) -> str:
    """Who owns what a key starts (jobs, stream sessions): a digest of the key (the key itself is not kept)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:32]
