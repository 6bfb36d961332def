"""BatchInvariantOps: a sample's result is the same bits alone or in any batch, and the math is unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from accel_diffusion.engine import batch_invariance, generate
from accel_diffusion.engine.batch_invariance import MAX_SPLIT_ROWS, BatchInvariantOps
from accel_diffusion.models.loading import LoadedPipeline
from accel_diffusion.strategy import GenerationRequest

torch.manual_seed(0)
W_LINEAR, B_LINEAR = torch.randn(96, 64), torch.randn(96)
W_CONV = torch.randn(32, 4, 3, 3)
W_CONV_T = torch.randn(8, 4, 4, 4)
GN_WEIGHT, GN_BIAS = torch.randn(64), torch.randn(64)

# name -> (operator applied to the batched operands, the batched operands for a batch of `n`)
CASES = {
    "linear 2-D": (lambda x: F.linear(x, W_LINEAR, B_LINEAR), lambda n: (torch.randn(n, 64),)),
    "linear 3-D": (lambda x: F.linear(x, W_LINEAR), lambda n: (torch.randn(n, 16, 64),)),
    "conv2d": (lambda x: F.conv2d(x, W_CONV, padding=1), lambda n: (torch.randn(n, 4, 8, 8),)),
    "conv_transpose2d": (lambda x: F.conv_transpose2d(x, W_CONV_T, stride=2, padding=1),
                         lambda n: (torch.randn(n, 8, 8, 8),)),
    "group_norm channels-last": (lambda x: F.group_norm(x, 32, GN_WEIGHT, GN_BIAS, 1e-6),
                                 lambda n: (torch.randn(n, 64, 8, 8).contiguous(memory_format=torch.channels_last),)),
    "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
             lambda n: tuple(torch.randn(n, 2, 64, 16) for _ in range(3))),
    "bmm": (lambda a, b: torch.bmm(a, b), lambda n: (torch.randn(n, 32, 48), torch.randn(n, 48, 24))),
    "baddbmm": (lambda c, a, b: torch.baddbmm(c, a, b, beta=0.5, alpha=0.25),
                lambda n: (torch.randn(n, 32, 24), torch.randn(n, 32, 48), torch.randn(n, 48, 24))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_sample_of_a_batch_equals_it_alone_bit_for_bit(name: str) -> None:
    op, operands = CASES[name]
    batch = operands(5)
    with BatchInvariantOps():
        together = op(*batch)
        alone = [op(*(t[i : i + 1] for t in batch)) for i in range(5)]
        pair = op(*(t[2:4] for t in batch))
        again = op(*batch)  # the signature's verdict is known now: the other path of the mode
    for i in range(5):
        assert torch.equal(together[i : i + 1], alone[i])
    assert torch.equal(pair, together[2:4])
    assert torch.equal(again, together)
    plain = op(*batch)  # outside the mode: the same math, up to float rounding
    assert together.shape == plain.shape
    torch.testing.assert_close(together, plain, rtol=1e-5, atol=1e-5)


def test_a_batch_variant_kernel_runs_per_sample_and_an_invariant_one_in_one_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def variant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # rounding that depends on the batch size
        calls.append(x.shape[0])
        return x @ w + 1e-3 * x.shape[0]

    def invariant(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2

    monkeypatch.setattr(batch_invariance, "_VERDICTS", {})
    x, w = torch.randn(4, 3), torch.randn(3, 3)
    mode = BatchInvariantOps()
    alone = torch.cat([variant(x[i : i + 1], w) for i in range(4)])
    calls.clear()
    for _ in range(2):
        assert torch.equal(mode.call(variant, 1, (x, w), {}), alone)
    assert calls == [1, 1, 1, 1, 4, 1, 1, 1, 1]  # checked once (per sample + whole), then per sample
    calls.clear()
    for _ in range(2):
        mode.call(invariant, 1, (x, w), {})
    assert calls == [1, 1, 1, 1, 4, 4]  # checked once, then one batched call
    calls.clear()
    with mode.grouped(2):  # units of two rows (an image's guidance branches)
        mode.call(variant, 1, (x, w), {})
        mode.call(variant, 1, (x[:2], w), {})
    assert calls == [2, 2, 4, 2]


def test_the_wrappers_pass_through_outside_the_mode_and_on_other_threads() -> None:
    BatchInvariantOps()  # installs the wrappers
    assert F.conv2d.__wrapped__ is not None  # type: ignore[attr-defined]
    x = torch.randn(3, 4, 8, 8)
    seen: list[object] = []
    with BatchInvariantOps() as mode:
        assert batch_invariance.active() is mode
        thread = threading.Thread(target=lambda: seen.append(batch_invariance.active()))
        thread.start()
        thread.join()
    assert seen == [None] and batch_invariance.active() is None
    assert torch.equal(F.conv2d(x, W_CONV, padding=1), F.conv2d.__wrapped__(x, W_CONV, padding=1))  # type: ignore


def test_suspended_leaves_the_mode_for_its_block_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_invariance, "_VERDICTS", {})
    calls: list[int] = []

    def variant(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x + 1e-3 * x.shape[0]

    wrapped = batch_invariance._wrapper(variant, 1, 2, linear=False)
    x = torch.randn(4, 3)
    with BatchInvariantOps() as mode:
        with batch_invariance.suspended():
            assert batch_invariance.active() is None
            wrapped(x)
        assert calls == [4] and batch_invariance.active() is mode
        calls.clear()
        wrapped(x)
        assert 1 in calls  # split per sample again
    assert batch_invariance.active() is None


def test_sdpa_splits_a_per_sample_mask_and_keeps_a_broadcast_one() -> None:
    q, k, v = (torch.randn(3, 2, 8, 4) for _ in range(3))
    per_sample = torch.rand(3, 1, 8, 8) > 0.3
    per_sample[..., 0] = True  # every query sees at least one key
    broadcast = per_sample[:1]
    with BatchInvariantOps():
        for mask in (per_sample, broadcast):
            together = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            torch.testing.assert_close(together, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        alone = F.scaled_dot_product_attention(q[1:2], k[1:2], v[1:2], attn_mask=per_sample[1:2])
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=per_sample)[1:2], alone)


def test_unbatched_inputs_and_token_matrices_pass_through_whole() -> None:
    image = torch.randn(4, 8, 8)  # conv2d on one unbatched (C, H, W) image: dim 0 is channels
    tokens = torch.randn(MAX_SPLIT_ROWS + 1, 64)  # (batch * tokens, features): one GEMM call
    expected = F.conv2d(image, W_CONV, padding=1), F.linear(tokens, W_LINEAR)
    with BatchInvariantOps():
        got = F.conv2d(image, W_CONV, padding=1), F.linear(tokens, W_LINEAR)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_generation_batched_or_alone_is_bit_identical_on_the_shapes_model(shapes_model: LoadedPipeline) -> None:
    prompts = ["a red circle on a blue background", "a white cross on a green background",
               "a yellow triangle on a black background"]
    seeds = [11, 12, 13]
    batched = generate(shapes_model, GenerationRequest.create(model="shapes", prompt=prompts, steps=4),
                       seeds=seeds, batch_invariant=True)
    for i, prompt in enumerate(prompts):
        alone = generate(shapes_model, GenerationRequest.create(model="shapes", prompt=prompt, steps=4),
                         seeds=[seeds[i]], batch_invariant=True)
        assert np.array_equal(alone.images[0], batched.images[i])
    plain = generate(shapes_model, GenerationRequest.create(model="shapes", prompt=prompts, steps=4), seeds=seeds)
    np.testing.assert_allclose(plain.images, batched.images, atol=1e-4)
