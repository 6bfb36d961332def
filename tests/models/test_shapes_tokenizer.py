"""The code-built CLIPTokenizer of the shapes model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

from transformers import CLIPTokenizer

from accel_diffusion.models.shapes.tokenizer import TASK_WORDS, build_tokenizer

TEXTS = ["a red circle on a blue background", "an orange cross on a black background", "Hello wörld! 42 ☃", ""]


def test_task_words_single_token() -> None:
    tok = build_tokenizer()
    for word in TASK_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok("a large white triangle on a purple background", add_special_tokens=False).input_ids
    assert len(ids) == 8


def test_save_reload_identical(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for text in TEXTS:
        assert tok(text).input_ids == again(text).input_ids
    assert again.model_max_length == 16 and len(again) == len(tok)


def test_arbitrary_text_tokenizes() -> None:
    tok = build_tokenizer()
    ids = tok("Zebra! ünïcödé ☃ 123", add_special_tokens=False).input_ids
    assert ids and tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == "zebra!ünïcödé☃123"


def test_padding_and_eos() -> None:
    tok = build_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    enc = tok("a red circle on a blue background", padding="max_length", max_length=16, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 16
    assert ids[0] == tok.bos_token_id and ids[8] == tok.eos_token_id
    assert all(i == tok.eos_token_id for i in ids[8:])
    long = tok(" ".join(["red"] * 40), padding="max_length", max_length=16, truncation=True).input_ids
    assert len(long) == 16 and long[-1] == tok.eos_token_id
