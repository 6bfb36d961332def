"""``accel-diffusion train shapes_mar`` on a tiny configuration: seeded (two runs give the same weights), resumable
(a run stopped after 1 step and resumed to 4 gives the weights of 4 uninterrupted steps), and its output loads as a
``MarPipeline`` that generates; the model card states the recipe's position-embedding scale and empty-prompt share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from accel_diffusion.ar.pipeline import MarPipeline
from accel_diffusion.ar.train import _lr_factor, train_shapes_mar
from accel_diffusion.registry import get_registry

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"n_images": 48, "batch_size": 8, "width": 16, "depth": 1, "head_width": 16, "head_depth": 1,
        "measure": False, "checkpoint_every": 2, "precision": "fp32", "compile": False}


def weights(path: Path) -> dict[str, torch.Tensor]:
    pipe = MarPipeline.from_pretrained(path)
    return {**{f"t.{k}": v for k, v in pipe.transformer.state_dict().items()},
            **{f"h.{k}": v for k, v in pipe.head.state_dict().items()}}


def test_seeded_resumable_and_loadable(tmp_path: Path) -> None:
    straight = train_shapes_mar(tmp_path / "a", tmp_path / "a.work", steps=4, **TINY)
    assert straight["steps_done"] == 4 and straight["args"]["pos_init_std"] == 0.5
    # stopped by its time cap after one step (a checkpoint is written), then resumed: the same 4 steps
    stopped = train_shapes_mar(tmp_path / "b", tmp_path / "b.work", steps=4, max_minutes=0.0, **TINY)
    assert stopped["steps_done"] == 1
    assert torch.load(tmp_path / "b.work" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert train_shapes_mar(tmp_path / "b", tmp_path / "b.work", steps=4, **TINY)["steps_done"] == 4
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (tmp_path / "a" / "README.md").read_text()
    assert "20% empty prompts" in card and "position embeddings initialised at std 0.5" in card
    registry = get_registry()
    pipe = MarPipeline.from_pretrained(tmp_path / "a")
    result = pipe.generate(["a red circle on a blue background"], [0], [2, 1], registry.build("sampler", "ddpm"),
                           lambda: registry.build("guidance", {"name": "cfg", "scale": 3.0}))
    assert result.images.shape == (1, 32, 32, 3) and result.cost.head_steps_total == 3
    # the default recipe: 1x1 patches (64 tokens of 4 values, MAR's patch size on its latents), 16 AR iterations
    assert pipe.config["patch_size"] == 1 and pipe.config["default_ar_iterations"] == 16
    assert pipe.transformer.config.num_tokens == 64 and pipe.head.config.token_dim == 4
    assert "1x1 patches: 64 tokens of 4 values" in card and "each once" in card


def test_the_first_recipes_2x2_patches_still_train_and_load(tmp_path: Path) -> None:
    """--patch-size 2 --head-repeats 4 --ar-iterations 8 is the recipe of the first shipped models: 16 tokens of 16."""
    info = train_shapes_mar(tmp_path / "c", tmp_path / "c.work", steps=2, patch_size=2, head_repeats=4,
                            ar_iterations=8, **TINY)
    assert info["args"]["patch_size"] == 2 and info["args"]["head_repeats"] == 4
    pipe = MarPipeline.from_pretrained(tmp_path / "c")
    assert pipe.config["patch_size"] == 2 and pipe.config["default_ar_iterations"] == 8
    assert pipe.transformer.config.num_tokens == 16 and pipe.head.config.token_dim == 16
    card = (tmp_path / "c" / "README.md").read_text()
    assert "2x2 patches: 16 tokens of 16 values" in card and "each 4 times" in card
    registry = get_registry()
    result = pipe.generate(["a red circle on a blue background"], [0], [1] * 8, registry.build("sampler", "ddim"),
                           lambda: registry.build("guidance", "none"))
    assert result.images.shape == (1, 32, 32, 3) and result.cost.tokens == [1, 1, 1, 2, 3, 2, 3, 3]


def test_the_learning_rate_anneals_over_the_steps_or_the_time_budget_whichever_is_further() -> None:
    assert [_lr_factor(s, 1100) for s in (0, 49, 99)] == [0.01, 0.5, 1.0]  # warm-up
    assert _lr_factor(100, 1100) == 1.0 and _lr_factor(1100, 1100) == pytest.approx(0.05)
    assert _lr_factor(600, 1100) == pytest.approx(0.05 + 0.95 * 0.5)  # half way by steps
    # a time budget half spent at a tenth of the steps: half way; spent: the floor, whatever the steps
    assert _lr_factor(200, 1100, time_fraction=0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert _lr_factor(200, 1100, time_fraction=1.3) == pytest.approx(0.05)
    assert _lr_factor(900, 1100, time_fraction=0.1) == _lr_factor(900, 1100)  # the steps are further
    assert _lr_factor(50, 1100, time_fraction=0.9) == 0.51  # warm-up first


def test_the_shipped_numerics_bf16_and_compiled_train_seeded_and_resumable(tmp_path: Path) -> None:
    """The recipe's defaults (bf16 autocast, the transformer and head compiled) on the tiny configuration: two
    steps straight equal one step, stopped, then resumed; the compiled steps move the weights in the direction the
    eager bf16 steps do (cosine > 0.95), and the card says how it was trained."""
    shipped = {**TINY, "precision": "bf16", "compile": True}
    straight = train_shapes_mar(tmp_path / "a", tmp_path / "a.work", steps=2, **shipped)
    train_shapes_mar(tmp_path / "b", tmp_path / "b.work", steps=2, max_minutes=0.0, **shipped)
    train_shapes_mar(tmp_path / "b", tmp_path / "b.work", steps=2, **shipped)
    eager = train_shapes_mar(tmp_path / "c", tmp_path / "c.work", steps=2, **{**shipped, "compile": False})
    train_shapes_mar(tmp_path / "init", tmp_path / "init.work", steps=0, **shipped)  # the seeded initial weights
    assert straight["args"]["precision"] == "bf16" and straight["args"]["compile"] is True
    assert eager["args"]["compile"] is False
    a, b, c, init = (weights(tmp_path / name) for name in ("a", "b", "c", "init"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the compiled steps move the weights as the eager ones do (Adam's first steps: about +-lr per weight)
    moved_compiled = torch.cat([(a[k] - init[k]).flatten() for k in a])
    moved_eager = torch.cat([(c[k] - init[k]).flatten() for k in a])
    assert moved_eager.abs().max() > 0
    assert float(torch.nn.functional.cosine_similarity(moved_compiled, moved_eager, dim=0)) > 0.95
    card = (tmp_path / "a" / "README.md").read_text()
    assert "bf16 autocast (attention on the math kernel), transformer and head compiled (torch.compile)" in card
