"""The block-skip hook with a mode per block (engine/block_skip.py) on the shipped `shapes` UNet: each block is skipped
in its own mode (a residual ResNet block beside a dropped attention block), a residual is computed once however many
steps reuse it, a mapping giving every block one mode is that mode bit for bit, unknown modes and blocks are refused
naming them; and the cost model's other half, what a skipped block still computes (``measure_skip_costs``)."""

from __future__ import annotations

import re

import pytest
import torch
from test_block_reuse import call, sample_of
from test_block_skip import SHAPES_BLOCKS, shapes_unet

from accel_diffusion.engine.block_skip import BlockSkip, _resnet_shortcut, measure_skip_costs

pytestmark = pytest.mark.usefixtures("single_thread")

RESNET, ATTENTION = "up_blocks.0.resnets.1", "mid_block.attentions.0"


class Seen:
    """Every (input, output) of one block, copied, while active."""

    def __init__(self, name: str) -> None:
        self.block = dict(shapes_unet().named_modules())[name]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> Seen:
        self.handle = self.block.register_forward_hook(
            lambda m, args, out: self.calls.append((args[0].clone(), sample_of(out).clone())))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def shortcut(x: torch.Tensor) -> torch.Tensor:
    return _resnet_shortcut(dict(shapes_unet().named_modules())[RESNET], x)


def test_each_block_is_skipped_in_its_own_mode() -> None:
    modes = {RESNET: "residual", ATTENTION: "drop"}
    with Seen(RESNET) as resnet, Seen(ATTENTION) as attention, \
            BlockSkip(shapes_unet(), {700: [RESNET, ATTENTION], 400: [RESNET]}, mode=modes) as skip:
        for t in (999, 700, 400):
            call(t)
    assert skip.mode_of(RESNET) == "residual" and skip.mode_of(ATTENTION) == "drop"
    assert skip.skipped_calls == 3  # the ResNet at 700 and 400, the attention block at 700
    (in_999, out_999), (in_700, out_700), (in_400, out_400) = resnet.calls
    residual = out_999 - shortcut(in_999)  # the last run's residual, reused at both skipped steps
    assert torch.equal(out_700, shortcut(in_700) + residual)
    assert torch.equal(out_400, shortcut(in_400) + residual)
    _, dropped, ran_again = attention.calls
    assert torch.equal(dropped[1], dropped[0])  # dropped: the identity at 700 (its input comes back)
    assert not torch.equal(ran_again[1], ran_again[0])


@pytest.mark.parametrize("mode", ["drop", "reuse", "residual"])
def test_one_mode_for_every_block_is_that_mode_bit_for_bit(mode: str) -> None:
    plan = {700: [RESNET, ATTENTION, "down_blocks.1.resnets.0"], 400: [ATTENTION]}
    blocks = {name for names in plan.values() for name in names}
    outputs = []
    for how in (mode, dict.fromkeys(blocks, mode)):
        with BlockSkip(shapes_unet(), plan, mode=how):  # type: ignore[arg-type]
            outputs.append([call(t) for t in (999, 700, 400)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    plain = call(700)
    with BlockSkip(shapes_unet(), {}, mode={RESNET: "residual"}) as nothing:  # skipping nothing: the plain UNet
        assert torch.equal(call(700), plain)
    assert nothing.skipped_calls == 0


def _plain_args(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from test_block_reuse import inputs

    x, context = inputs()
    return x, torch.tensor(t), context


@pytest.mark.parametrize(("mode", "message"), [
    ({RESNET: "cache"}, f"mode must be one of 'drop', 'reuse', 'residual', not 'cache' (block {RESNET!r})"),
    ({"up_blocks.9.resnets.0": "drop"}, "mode: no skippable block 'up_blocks.9.resnets.0' in this UNet"),
])
def test_an_unknown_mode_or_block_in_the_mapping_is_refused_naming_it(mode: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockSkip(shapes_unet(), {700: [RESNET]}, mode=mode)


def test_the_cost_of_a_skipped_block_per_mode() -> None:
    unet = shapes_unet()
    x, t, context = _plain_args(500)
    costs = measure_skip_costs(unet, lambda: unet(x, t, encoder_hidden_states=context, return_dict=False), repeats=3)
    assert sorted(costs) == sorted(SHAPES_BLOCKS)
    for name, cost in costs.items():
        assert set(cost) == {"drop", "reuse", "residual"} and cost["reuse"] == 0.0
        assert 0.0 <= cost["drop"] < 0.2 and 0.0 < cost["residual"] < 0.2, (name, cost)
        if "attentions" in name:
            assert cost["drop"] == 0.0  # the identity: nothing computed
    # up_blocks.0.resnets.0 has a 1x1 shortcut convolution: dropping it still runs that convolution
    assert costs["up_blocks.0.resnets.0"]["drop"] > 0.0
