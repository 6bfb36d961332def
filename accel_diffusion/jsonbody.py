"""JSON from outside: the one bounded parser of every entry point that reads JSON a user sent.

HTTP bodies, the multipart ``strategy`` field, WebSocket control messages, batch manifest lines and
the CLI's ``--strategy`` all parse through :func:`parse_json`. It refuses, as an
:class:`InvalidRequestError` naming the field, what the standard library would turn into a crash
or a generic error: text over a size limit, arrays and objects nested deeper than a limit (the
standard parser recurses once per level and raises ``RecursionError`` near a thousand), bytes that
are not UTF-8, and syntax errors (with their line and column). Depth is measured before parsing,
without recursion, so a hostile document costs one linear scan.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from accel_diffusion.errors import InvalidRequestError

MAX_JSON_DEPTH = 32  # the deepest request the API defines nests 4 levels (body > strategy > component > list)
MAX_JSON_BYTES = 16 * 1024 * 1024
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (0 for a scalar); brackets inside strings do not count."""
    codes = np.frombuffer(_STRING.sub("", text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int32)
    steps -= (codes == ord("]")) | (codes == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: str | bytes | bytearray, field: str = "body", *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON sent by a user; every refusal is an InvalidRequestError naming ``field``.

    ``max_bytes`` bounds the UTF-8 size, ``max_depth`` how deep arrays and objects may nest.
    """
    size = len(data)
    if isinstance(data, str) and 4 * size > max_bytes:  # at most 4 UTF-8 bytes a character
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidRequestError(field, f"is {size} bytes of JSON; at most {max_bytes} allowed")
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
        except UnicodeDecodeError:
            raise InvalidRequestError(field, "is not UTF-8 text") from None
    else:
        text = data
    cheap_bound = text.count("[") + text.count("{")  # depth cannot exceed the number of opening brackets
    if cheap_bound > max_depth:
        depth = nesting_depth(text)
        if depth > max_depth:
            raise InvalidRequestError(field, f"nests arrays and objects {depth} levels deep; at most {max_depth} "
                                      "allowed (send a flatter value)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(field, f"is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                                  ) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidRequestError(field, f"is not valid JSON: {exc}") from None
