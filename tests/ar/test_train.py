"""``accel-diffusion train shapes_mar`` on a tiny configuration: seeded (two runs give the same weights), resumable
(a run stopped after 1 step and resumed to 4 gives the weights of 4 uninterrupted steps), and its output loads as a
``MarPipeline`` that generates; the model card states the recipe's position-embedding scale and empty-prompt share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from accel_diffusion.ar.pipeline import MarPipeline
from accel_diffusion.ar.train import train_shapes_mar
from accel_diffusion.registry import get_registry

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = {"n_images": 48, "batch_size": 8, "width": 16, "depth": 1, "head_width": 16, "head_depth": 1,
        "measure": False, "checkpoint_every": 2}


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
