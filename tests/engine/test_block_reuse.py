"""The block-skip hook's reuse mode (DeepCache-style, engine/block_skip.py) on the shipped `shapes` UNet: a block
reused at step k returns exactly its output of the last step where it ran; the first call and another batch size run
it; skipping nothing is the plain UNet bit for bit; the cache lives in one ``with`` block."""

from __future__ import annotations

import re

import pytest
import torch
from test_block_skip import SHAPES_BLOCKS, shapes_unet

from accel_diffusion.engine.block_skip import BlockSkip

pytestmark = pytest.mark.usefixtures("single_thread")


def inputs(rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    unet = shapes_unet()
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, unet.config.in_channels, 8, 8, generator=gen)
    context = torch.randn(rows, 12, unet.config.cross_attention_dim, generator=gen)
    return x, context


@torch.no_grad()
def call(t: int, rows: int = 2) -> torch.Tensor:
    x, context = inputs(rows)
    return shapes_unet()(x, torch.tensor(t), encoder_hidden_states=context, return_dict=False)[0]


def sample_of(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


class BlockOutputs:
    """Records (a copy of) a block's output at every UNet call."""

    def __init__(self, name: str) -> None:
        self.block = dict(shapes_unet().named_modules())[name]
        self.seen: list[torch.Tensor] = []

    def __enter__(self) -> BlockOutputs:
        self.handle = self.block.register_forward_hook(lambda m, a, out: self.seen.append(sample_of(out).clone()))
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@pytest.mark.parametrize("name", ["mid_block.attentions.0", "up_blocks.0.resnets.1", "down_blocks.1.resnets.0"])
def test_a_reused_block_gives_exactly_its_output_of_the_step_before(name: str) -> None:
    plain = {t: call(t) for t in (999, 700, 400)}
    with BlockOutputs(name) as outputs, BlockSkip(shapes_unet(), {700: [name], 400: [name]}, mode="reuse") as skip:
        first, second, third = call(999), call(700), call(400)
    assert torch.equal(first, plain[999])  # the first call runs every block (nothing cached yet)
    assert torch.equal(outputs.seen[1], outputs.seen[0]) and torch.equal(outputs.seen[2], outputs.seen[0])
    assert skip.skipped_calls == 2
    assert not torch.equal(second, plain[700])

    # golden: the plain UNet at t=700 with the block's output replaced by its output at t=999
    block = dict(shapes_unet().named_modules())[name]
    at_999 = outputs.seen[0]

    def replace(module: torch.nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return at_999
        return (at_999,) if isinstance(output, tuple) else type(output)(sample=at_999)

    handle = block.register_forward_hook(replace)
    try:
        assert torch.equal(second, call(700))
        assert torch.equal(third, call(400))
    finally:
        handle.remove()


def test_reuse_keeps_the_last_run_output_and_refreshes_it_where_the_block_runs() -> None:
    name = "up_blocks.0.attentions.1"
    with BlockOutputs(name) as outputs, BlockSkip(shapes_unet(), {700: [name], 250: [name]}, mode="reuse"):
        for t in (999, 700, 400, 250):
            call(t)
    ran_999, reused_700, ran_400, reused_250 = outputs.seen
    assert torch.equal(reused_700, ran_999) and torch.equal(reused_250, ran_400)
    assert not torch.equal(ran_400, ran_999)


def test_another_batch_size_runs_the_block_and_the_cache_ends_with_the_block() -> None:
    name = "mid_block.attentions.0"
    unet = shapes_unet()
    plain_3, plain_2 = call(700, rows=3), call(700)
    with BlockSkip(unet, {700: [name]}, mode="reuse") as skip:
        call(999, rows=2)
        assert torch.equal(call(700, rows=3), plain_3)  # 3 rows: nothing cached for them, the block runs
        assert skip.skipped_calls == 0
        call(700, rows=3)  # now cached for 3 rows
        assert skip.skipped_calls == 1
    with BlockSkip(unet, {700: [name]}, mode="reuse") as fresh:  # a new generation: an empty cache
        assert torch.equal(call(700), plain_2)
        assert fresh.skipped_calls == 0
    assert not fresh._cache and "forward" not in vars(dict(unet.named_modules())[name])


def test_reuse_skipping_nothing_is_bit_identical() -> None:
    plain = {t: call(t) for t in (999, 500)}
    with BlockSkip(shapes_unet(), {500: SHAPES_BLOCKS}, mode="reuse") as skip:
        assert torch.equal(call(999), plain[999])  # every block patched and cached, none reused at 999
        assert skip.skipped_calls == 0
        reused = call(500)
    assert skip.skipped_calls == len(SHAPES_BLOCKS)
    assert not torch.equal(reused, plain[500])
    with BlockSkip(shapes_unet(), {}, mode="reuse"):
        assert torch.equal(call(500), plain[500])


def test_reusing_the_deep_blocks_runs_the_up_block_output_of_the_step_before() -> None:
    """DeepCache on this two-level UNet: reuse the deep branch; the last deep block's output is the one reused."""
    deep = [b for b in SHAPES_BLOCKS if not b.startswith(("down_blocks.0", "up_blocks.1"))]
    with BlockOutputs("up_blocks.0.attentions.1") as outputs, BlockSkip(shapes_unet(), {700: deep}, mode="reuse"):
        call(999)
        call(700)
    assert torch.equal(outputs.seen[1], outputs.seen[0])


def test_an_unknown_mode_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=re.escape("mode must be one of 'drop', 'reuse', 'residual', not 'cache'")):
        BlockSkip(shapes_unet(), {}, mode="cache")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["up_blocks.0.resnets.1", "mid_block.attentions.0"])
def test_residual_mode_adds_the_residual_of_the_step_before_to_this_steps_skip_path(name: str) -> None:
    from accel_diffusion.engine.block_skip import _resnet_shortcut

    block = dict(shapes_unet().named_modules())[name]

    def skip_path(x: torch.Tensor) -> torch.Tensor:
        return _resnet_shortcut(block, x) if "resnets" in name else x

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), sample_of(out).clone())))
    try:
        with BlockSkip(shapes_unet(), {700: [name]}, mode="residual") as skip:
            call(999)
            second = call(700)
    finally:
        handle.remove()
    (in_999, out_999), (in_700, out_700) = seen
    assert skip.skipped_calls == 1
    assert torch.equal(out_700, skip_path(in_700) + (out_999 - skip_path(in_999)))

    def replace(module: torch.nn.Module, args: tuple, output: object) -> object:  # golden: the plain UNet, patched
        value = skip_path(args[0]) + (out_999 - skip_path(in_999))
        if isinstance(output, torch.Tensor):
            return value
        return (value,) if isinstance(output, tuple) else type(output)(sample=value)

    handle = block.register_forward_hook(replace)
    try:
        assert torch.equal(second, call(700))
    finally:
        handle.remove()
