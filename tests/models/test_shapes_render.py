"""Renderer and caption grammar of the built-in shapes model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from accel_diffusion.models.shapes.render import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    ShapeSpec,
    all_combinations,
    caption,
    combination_prompt,
    parse_caption,
    random_specs,
    render,
    render_dataset,
)


def test_combinations() -> None:
    combos = all_combinations()
    assert len(combos) == 196 == len(set(combos))
    assert all(c != b for _, c, b in combos)
    assert {s for s, _, _ in combos} == set(SHAPES)
    assert {c for _, c, _ in combos} == set(COLORS)
    assert {b for _, _, b in combos} == set(BACKGROUNDS)
    assert combos == all_combinations()


def test_caption_round_trip() -> None:
    for combo in all_combinations():
        assert parse_caption(combination_prompt(*combo)) == combo
        for size in ("small", "large"):
            assert parse_caption(combination_prompt(*combo, size=size)) == combo
    rng = np.random.default_rng(0)
    for spec in random_specs(200, rng):
        assert parse_caption(caption(spec)) == (spec.shape, spec.color, spec.background)


def test_articles() -> None:
    assert combination_prompt("circle", "red", "blue") == "a red circle on a blue background"
    assert combination_prompt("cross", "orange", "black") == "an orange cross on a black background"
    assert combination_prompt("square", "white", "orange") == "a white square on an orange background"
    assert combination_prompt("square", "orange", "white", size="large").startswith("a large orange")


@pytest.mark.parametrize(
    "bad", ["a red circle", "a red hexagon on a blue background", "a red circle on a red background", ""]
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_palette_bounds_and_shape() -> None:
    images, captions, labels = render_dataset(2000, seed=3)
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == 2000 and all(len(v) == 2000 for v in labels.values())
    assert images.min() >= 10 and images.max() <= 250
    assert any(c.split()[1] in ("small", "large") for c in captions)


def test_determinism() -> None:
    a, ca, la = render_dataset(300, seed=7)
    b, cb, lb = render_dataset(300, seed=7)
    c, _, _ = render_dataset(300, seed=8)
    assert np.array_equal(a, b) and ca == cb and all(np.array_equal(la[k], lb[k]) for k in la)
    assert not np.array_equal(a, c)


def test_anti_aliasing_and_single_render() -> None:
    spec = ShapeSpec("circle", "red", "blue", None, 10, 16, 16)
    img = render(spec)
    colours = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(colours) > 2  # edge pixels are blends of the two colours
    assert tuple(img[16, 16]) != tuple(img[0, 0])
    batch, _, _ = render_dataset(1, seed=0)
    spec0 = random_specs(1, np.random.default_rng(0))[0]
    assert np.array_equal(batch[0], render(spec0))
    with pytest.raises(ValueError):
        render(ShapeSpec("circle", "red", "blue", None, 12, 5, 16))
