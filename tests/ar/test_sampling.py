"""The AR loop (ar/sampling.py) on tiny random-weight models: NFE and head-step accounting equal the analytic
counts, DiSA with upper = lower is bit-identical to the constant head, batch = single calls under a deterministic
head sampler, one progress event per AR iteration, cancellation between iterations."""

from __future__ import annotations

import threading

import pytest
import torch

from accel_diffusion.ar.head import HEAD_NOISE, DiffusionHead
from accel_diffusion.ar.masking import head_cost, tokens_per_iteration
from accel_diffusion.ar.model import MarTransformer, patchify, unpatchify
from accel_diffusion.ar.sampling import generate_tokens
from accel_diffusion.engine.hooks import GenerationHooks, StepEvent
from accel_diffusion.errors import GenerationCancelled
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.disa import DisaSchedule

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS, TOKEN_DIM, TEXT_LEN, TEXT_DIM = 16, 4, 3, 8


def tiny_models() -> tuple[MarTransformer, DiffusionHead]:
    torch.manual_seed(0)
    transformer = MarTransformer(token_dim=TOKEN_DIM, num_tokens=TOKENS, text_dim=TEXT_DIM, text_len=TEXT_LEN,
                                 width=16, depth=1, heads=2).eval()
    head = DiffusionHead(token_dim=TOKEN_DIM, cond_dim=16, width=16, depth=1).eval()
    with torch.no_grad():  # random everywhere (the head's adaLN-zero init would make it output zero)
        for p in [*transformer.parameters(), *head.parameters()]:
            p.normal_(0.0, 0.3)
    return transformer, head


def run(plan: list[int], sampler: str = "ddpm", guidance: dict | None = None, seeds: tuple[int, ...] = (0, 1),
        hooks: GenerationHooks | None = None) -> tuple[torch.Tensor, object]:
    transformer, head = tiny_models()
    text_gen = torch.Generator().manual_seed(7)
    texts = torch.randn(4, TEXT_LEN, TEXT_DIM, generator=text_gen)
    registry = get_registry()
    spec = guidance or {"name": "cfg", "scale": 3.0}
    return generate_tokens(transformer, head, dict(HEAD_NOISE), texts[list(seeds)], texts[3:], plan,
                           registry.build("sampler", sampler), lambda: registry.build("guidance", spec),
                           [torch.Generator().manual_seed(s) for s in seeds], hooks or GenerationHooks())


@pytest.mark.parametrize(("guidance", "branches"), [({"name": "cfg", "scale": 3.0}, 2), ({"name": "none"}, 1)])
def test_nfe_accounting_equals_the_analytic_count(guidance: dict, branches: int) -> None:
    plan = DisaSchedule(upper=12, lower=3, kind="linear").plan(6)
    assert plan == [12, 10, 8, 6, 4, 3]
    tokens, cost = run(plan, guidance=guidance)
    counts = tokens_per_iteration(TOKENS, 6)
    token_steps, sequential = head_cost(TOKENS, plan)
    assert cost.tokens == counts and sum(counts) == TOKENS
    assert cost.head_steps == plan and cost.head_steps_total == sequential == 43
    assert cost.head_nfe == branches * sequential  # head calls, each over every image's tokens of the iteration
    assert cost.head_token_evals == branches * token_steps == branches * sum(c * s for c, s in zip(counts, plan))
    assert cost.transformer_nfe == branches * 6
    assert torch.isfinite(tokens).all() and tokens.shape == (2, TOKENS, TOKEN_DIM)


@pytest.mark.parametrize("kind", ["linear", "cosine", "two_stage"])
def test_disa_with_equal_bounds_is_bit_identical_to_the_constant_head(kind: str) -> None:
    constant, _ = run([7] * 5)
    annealed, cost = run(DisaSchedule(upper=7, lower=7, kind=kind).plan(5))
    assert cost.head_steps == [7] * 5
    assert torch.equal(constant, annealed)
    different, _ = run(DisaSchedule(upper=7, lower=3, kind=kind).plan(5))
    assert not torch.equal(constant, different)


def test_batch_equals_single_calls_with_a_deterministic_head() -> None:
    plan = [4, 3, 2]
    batch, _ = run(plan, sampler="ddim", seeds=(0, 1, 2))
    for i in range(3):
        single, _ = run(plan, sampler="ddim", seeds=(i,))
        assert torch.allclose(batch[i], single[0], atol=1e-5)


def test_seeds_reproduce_and_differ() -> None:
    a, _ = run([3, 3, 3])
    b, _ = run([3, 3, 3])
    c, _ = run([3, 3, 3], seeds=(2, 1))
    assert torch.equal(a, b) and not torch.equal(a[0], c[0])


def test_progress_per_iteration_and_cancel_between_iterations() -> None:
    events: list[StepEvent] = []
    run([2] * 4, hooks=GenerationHooks(on_step=events.append))
    assert [(e.step, e.total) for e in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    cancel = threading.Event()

    def on_step(event: StepEvent) -> None:
        if event.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled) as info:
        run([2] * 4, hooks=GenerationHooks(on_step=on_step, cancel=cancel))
    assert (info.value.step, info.value.total) == (2, 4)  # stopped before the third iteration


def test_patchify_round_trip() -> None:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = patchify(latents, 2)
    assert tokens.shape == (2, 16, 16)
    assert torch.equal(tokens[0, 1], latents[0, :, 0:2, 2:4].reshape(-1))  # second patch of the first row
    assert torch.equal(unpatchify(tokens, 2, 4, 8, 8), latents)
