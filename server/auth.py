"""API keys: one constant-time comparison for every route that checks one."""

from __future__ import annotations

import hmac


def api_key_matches(given: str, keys: list[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``; compares with every key, in constant time, whatever matches."""
    token = given.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched
