"""The one bounded JSON parser of every entry point: size, nesting depth, encoding and syntax errors
are InvalidRequestErrors naming the field, never a RecursionError or a bare ValueError."""

from __future__ import annotations

import json

import pytest

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.jsonbody import MAX_JSON_DEPTH, nesting_depth, parse_json


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_depth_counts_brackets_outside_strings_only() -> None:
    assert nesting_depth('{"a": "[[[[\\"[[{", "b": [[1], [2, [3]]], "c": {}}') == 4
    assert nesting_depth("3") == 0 and nesting_depth(nested(100_000)) == 100_000


def test_depth_up_to_the_limit_parses_and_deeper_is_refused_naming_the_field() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH)) == json.loads(nested(MAX_JSON_DEPTH))
    for depth in (MAX_JSON_DEPTH + 1, 100_000):  # 100 000 levels: json.loads alone raises RecursionError
        with pytest.raises(InvalidRequestError) as refused:
            parse_json('{"strategy": ' + nested(depth) + "}", "strategy")
        assert refused.value.field == "strategy"
        assert refused.value.message == (f"nests arrays and objects {depth + 1} levels deep; at most "
                                         f"{MAX_JSON_DEPTH} allowed (send a flatter value)")
    wide = "[" + ",".join(["[]"] * 50_000) + "]"  # many brackets, two levels: allowed
    assert len(parse_json(wide)) == 50_000
    assert parse_json('{"prompt": "' + "[" * 1000 + '"}') == {"prompt": "[" * 1000}


@pytest.mark.parametrize(("data", "message"), [
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ('{"a": 1,\n "b": }', "is not valid JSON: Expecting value (line 2, column 7)"),
    (b'{"a": "\xff"}', "is not UTF-8 text"),
    ("1" * 5000, "is not valid JSON: Exceeds the limit (4300 digits)"),  # a ValueError, not a JSONDecodeError
    ('"' + "x" * 20_000 + '"', "is 20002 bytes of JSON; at most 10000 allowed"),
    (b'"' + b"x" * 20_000 + b'"', "is 20002 bytes of JSON; at most 10000 allowed"),
    ('"' + "\u00e9" * 5000 + '"', "is 10002 bytes of JSON; at most 10000 allowed"),  # UTF-8 bytes, not characters
], ids=["syntax", "syntax-line-2", "not-utf8", "long-integer", "large-text", "large-bytes", "large-2-byte-chars"])
def test_bad_input_is_an_invalid_request_naming_the_field(data: str | bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_json(data, "line", max_bytes=10_000)
    assert refused.value.field == "line" and refused.value.message.startswith(message), refused.value.message


def test_bytes_and_text_parse_like_the_standard_library() -> None:
    body = '{"prompt": "caf\u00e9 \\u00e9", "n": 2, "x": [1.5, null, true]}'
    assert parse_json(body) == parse_json(body.encode()) == json.loads(body)
    assert parse_json('"' + "\u00e9" * 4999 + '"', max_bytes=10_000) == "\u00e9" * 4999  # 10000 bytes: allowed
    assert parse_json(b"\xef\xbb\xbf{}") == {}  # a UTF-8 byte order mark, as json.loads(bytes) allows
