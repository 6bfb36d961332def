"""Text checks: lone UTF-16 surrogates are found (with their place) and replaceable."""

from __future__ import annotations

import pytest

from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.text import check_text, check_texts, replace_unencodable, unencodable_reason


def test_lone_surrogates_are_found_with_their_code_point_and_place() -> None:
    assert unencodable_reason("a red circle \U0001f534 é") is None
    assert unencodable_reason("ab\udc80") == ("contains an unpaired UTF-16 surrogate (U+DC80) at character 2, "
                                              "which cannot be encoded as UTF-8; send valid Unicode text")
    with pytest.raises(InvalidRequestError) as err:
        check_text("prompt", "\ud800")
    assert err.value.field == "prompt"


def test_nested_values_are_checked_keys_included_and_skipped_fields_are_not() -> None:
    check_texts({"init_image": "/photos/\udcff.png", "prompt": "ok"}, "", skip=("init_image",))
    with pytest.raises(InvalidRequestError) as err:
        check_texts({"a": [{"b": "ok"}, {"c": ["x", "\ud801"]}]}, "strategy")
    assert err.value.field == "strategy.a.1.c.1"


def test_replacement_gives_one_replacement_character_per_lone_surrogate() -> None:
    assert replace_unencodable("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert replace_unencodable("\ud83d\ude00") == "\U0001f600"  # a pair held as two code points: its character
    assert replace_unencodable("plain") == "plain"
