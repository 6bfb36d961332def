"""Text that can be encoded: requests may only carry valid Unicode, and responses never fail on text.

A Python ``str`` can hold lone UTF-16 surrogates (JSON ``"\\ud800"``, or undecodable bytes of a command
line under ``surrogateescape``). No tokenizer takes them and no UTF-8 encoder writes them, so the
request edge refuses them (``check_text``), naming the field; ``replace_unencodable`` is the last line
of defence for text that is written out anyway (an error message quoting a field name, say).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from accel_diffusion.errors import InvalidRequestError


def unencodable_reason(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (its first lone surrogate), or None if it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"contains an unpaired UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}, "
                "which cannot be encoded as UTF-8; send valid Unicode text")
    return None


def check_text(field: str, text: str) -> str:
    """``text`` unchanged, or InvalidRequestError on ``field`` when it cannot be encoded."""
    reason = unencodable_reason(text)
    if reason is not None:
        raise InvalidRequestError(field, reason)
    return text


def check_texts(value: Any, field: str, skip: Iterable[str] = ()) -> None:
    """Check every string in ``value`` (nested dicts and lists, keys included); the error names the
    path of the first bad one (``strategy.sampler.name``, ``prompt.1``). Top-level keys in ``skip``
    (a file path, say) are not checked."""
    skipped = set(skip)
    if isinstance(value, str):
        check_text(field, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            path = f"{field}.{key}" if field else str(key)
            if isinstance(key, str) and unencodable_reason(key) is not None:
                raise InvalidRequestError(replace_unencodable(path), f"the field name {unencodable_reason(key)}")
            if key not in skipped:
                check_texts(item, path)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_texts(item, f"{field}.{index}" if field else str(index))


def replace_unencodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD (surrogate pairs become their character)."""
    if unencodable_reason(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
