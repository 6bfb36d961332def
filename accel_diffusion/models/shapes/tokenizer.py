"""A real ``transformers.CLIPTokenizer`` for the ``shapes`` model, built in code.

Byte-level base vocabulary (256 byte characters plus their ``</w>`` forms) so any text
tokenizes; BPE merges that make every task word a single token.
"""

from __future__ import annotations

import itertools

from transformers import CLIPTokenizer

from accel_diffusion.models.shapes.render import BACKGROUNDS, SHAPES, SIZE_WORDS

MAX_LENGTH = 16
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

#: Words that each become a single token.
TASK_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "on",
    "background",
    *SHAPES,
    *BACKGROUNDS,
    *SIZE_WORDS,
    "medium",
    "the",
    "and",
    "of",
    "with",
    "image",
    "picture",
    "photo",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(symbols))]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list (later merges never disturb earlier words)."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in TASK_WORDS:
        symbols = _apply_bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1], *symbols[2:]]
    seen: dict[str, int] = {}
    for t in [*tokens, BOS, EOS]:
        seen.setdefault(t, len(seen))
    return seen, merges


def build_tokenizer(model_max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Build the shapes CLIPTokenizer (eos = pad = ``<|endoftext|>``)."""
    vocab, merges = build_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )
