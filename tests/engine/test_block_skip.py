"""The UNet block-skip hook (engine/block_skip.py) on the shipped `shapes` UNet: skipping nothing is the plain UNet
bit for bit, a skipped ResNet block is its skip connection, a skipped attention block the identity."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from accel_diffusion.engine.block_skip import BlockSkip, skippable_blocks
from accel_diffusion.models.registry import BUILTIN_DIR

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES_BLOCKS = [
    "down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0",
    "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
    "up_blocks.0.resnets.0", "up_blocks.0.attentions.0", "up_blocks.0.resnets.1", "up_blocks.0.attentions.1",
    "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
]


@functools.cache
def shapes_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(BUILTIN_DIR / "shapes" / "unet").eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    unet = shapes_unet()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    context = torch.randn(2, 12, unet.config.cross_attention_dim, generator=gen)
    return x, context


@torch.no_grad()
def run(t: int) -> torch.Tensor:
    x, context = inputs()
    return shapes_unet()(x, torch.tensor(t), encoder_hidden_states=context, return_dict=False)[0]


def test_the_skippable_blocks_in_forward_order() -> None:
    blocks = skippable_blocks(shapes_unet())
    assert sorted(blocks) == sorted(SHAPES_BLOCKS)
    stages = [name.split(".")[0] for name in blocks]
    assert stages == sorted(stages, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_skipping_nothing_is_bit_identical_and_leaves_nothing_behind() -> None:
    unet = shapes_unet()
    plain = {t: run(t) for t in (999, 500)}
    with BlockSkip(unet, {}):
        assert torch.equal(run(999), plain[999])
    with BlockSkip(unet, {500: SHAPES_BLOCKS, 250: []}) as skip:  # every block patched, none skipped at 999
        assert torch.equal(run(999), plain[999])
        assert skip.skipped_calls == 0
        assert not torch.equal(run(500), plain[500])
        assert skip.skipped_calls == len(SHAPES_BLOCKS)
    modules = dict(unet.named_modules())
    assert all("forward" not in vars(modules[name]) for name in SHAPES_BLOCKS)
    assert not unet._forward_pre_hooks
    assert torch.equal(run(500), plain[500])


@pytest.mark.parametrize("name", ["up_blocks.1.resnets.0", "down_blocks.0.resnets.0", "mid_block.attentions.0",
                                  "up_blocks.0.attentions.1"])
def test_a_skipped_block_is_its_skip_connection(name: str) -> None:
    unet = shapes_unet()
    block = dict(unet.named_modules())[name]
    seen: dict[str, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: tuple, output: object) -> None:
        seen["in"] = args[0] if args else None
        seen["out"] = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)

    handle = block.register_forward_hook(record)
    try:
        with BlockSkip(unet, {700: [name]}):
            run(700)
    finally:
        handle.remove()
    x = seen["in"]
    if "resnets" in name:
        expected = block.conv_shortcut(x) if block.conv_shortcut is not None else x
        expected = expected / block.output_scale_factor
        assert (block.conv_shortcut is not None) == name.startswith("up_blocks")  # concatenated skip features
    else:
        expected = x
    assert torch.equal(seen["out"], expected)


def test_an_unknown_block_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=re.escape("timestep 999: no skippable block 'up_blocks.3.resnets.0'")):
        BlockSkip(shapes_unet(), {999: ["up_blocks.3.resnets.0"]})


def test_the_blocks_are_known_from_the_config_alone() -> None:
    from accel_diffusion.engine.block_skip import model_unet_blocks, unet_blocks_of_config

    assert unet_blocks_of_config(shapes_unet().config) == skippable_blocks(shapes_unet())
    assert model_unet_blocks(str(BUILTIN_DIR / "shapes")) == tuple(skippable_blocks(shapes_unet()))
    assert model_unet_blocks(str(BUILTIN_DIR / "no-such-model")) is None


def test_the_measured_cost_model_shares_one_unet_call_among_the_blocks() -> None:
    from accel_diffusion.engine.block_skip import measure_block_costs

    unet = shapes_unet()
    x, context = inputs()
    shares = measure_block_costs(unet, lambda: unet(x, torch.tensor(500), encoder_hidden_states=context), repeats=3)
    assert list(shares) == ["", *skippable_blocks(unet)]
    assert all(0 < v < 1 for v in shares.values())
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert not unet._forward_pre_hooks and not any(m._forward_hooks for m in unet.modules())  # hooks removed
