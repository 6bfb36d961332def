"""Generation with a masked-autoregressive model: the outer AR loop; the head's inner loop is the engine's.

Every AR iteration k of K: the transformer reads the tokens known so far (the rest masked) and gives
one condition z per position; the next ``tokens_per_iteration(N, K)[k]`` positions of each image's
random order are sampled by the diffusion head through ``engine.loop.denoise`` with a fresh scheduler
from the sampler component, running ``plan[k]`` steps (a DiSA annealer's ``steps_for(k, K)``, or a
constant count); classifier-free guidance evaluates the head on the conditional and unconditional
z (the transformer runs on both prompts) and combines them with the guidance component.

Randomness: each image has its own generator (seeded from its seed) for its random order and its
tokens' initial head noise, so with a deterministic head sampler (``ddim``) an image of a batch equals
the same image generated alone. A stochastic sampler's step noise (``ddpm``) comes from one generator
per generation, seeded from the first image's seed: drawing it per image would cost one random call per
token and step (as much as the head itself at batch 16), so under ``ddpm`` a batch is reproducible
from its seeds but its images differ from single calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel_diffusion.ar.head import DiffusionHead
from accel_diffusion.ar.masking import tokens_per_iteration
from accel_diffusion.ar.model import MarTransformer
from accel_diffusion.engine.conditioning import Conditioning
from accel_diffusion.engine.hooks import NO_HOOKS, GenerationHooks, LoopCounters, StepEvent
from accel_diffusion.engine.loop import denoise
from accel_diffusion.guidance.base import COND, UNCOND, Guidance
from accel_diffusion.samplers.base import Sampler
from accel_diffusion.schedules.base import scheduler_accepts


@dataclass
class ArCost:
    """What a generation spent: head steps per AR iteration and their sum, tokens per iteration,
    head evaluations (NFE: every branch counted, per token batch), sum of tokens x steps x branches per
    image, transformer passes (branches counted), and seconds in the head and the transformer."""

    head_steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    head_nfe: int = 0
    head_token_evals: int = 0
    transformer_nfe: int = 0
    head_seconds: float = 0.0
    transformer_seconds: float = 0.0

    @property
    def head_steps_total(self) -> int:
        return sum(self.head_steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ar_iterations": len(self.head_steps), "head_steps": list(self.head_steps),
            "head_steps_total": self.head_steps_total, "tokens_per_iteration": list(self.tokens),
            "head_nfe": self.head_nfe, "head_token_evals": self.head_token_evals,
            "transformer_nfe": self.transformer_nfe, "head_seconds": round(self.head_seconds, 6),
            "transformer_seconds": round(self.transformer_seconds, 6),
        }


def sample_head(
    head: torch.nn.Module,
    z: dict[str, torch.Tensor],
    noise: torch.Tensor,
    sampler: Sampler,
    head_scheduler_config: dict[str, Any],
    num_steps: int,
    guidance: Guidance,
    generators: list[torch.Generator] | None = None,
    counters: LoopCounters | None = None,
) -> torch.Tensor:
    """Tokens sampled by ``head`` from ``noise`` (M, D) given per-branch conditions ``z`` ({branch: (M, C)}),
    ``num_steps`` steps of ``sampler`` on the head's noise process, through the engine's loop.
    ``generators``: the sampler's step noise, one generator for all rows or one per row (M)."""
    scheduler = sampler.make_scheduler(head_scheduler_config, {})
    scheduler.set_timesteps(num_steps, device=noise.device)
    step_kwargs = dict(sampler.step_kwargs())
    if generators is not None and scheduler_accepts(scheduler, "step", "generator"):
        step_kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    guidance.begin(None)
    conditioning = Conditioning({branch: {"z": value} for branch, value in z.items()})
    return denoise(head, noise * scheduler.init_noise_sigma, scheduler, scheduler.timesteps, guidance,
                   conditioning, step_kwargs=step_kwargs, counters=counters)


@torch.no_grad()
def generate_tokens(
    transformer: MarTransformer,
    head: DiffusionHead,
    head_scheduler_config: dict[str, Any],
    text: torch.Tensor,
    empty_text: torch.Tensor,
    plan: list[int],
    sampler: Sampler,
    make_guidance: Callable[[], Guidance],
    generators: list[torch.Generator],
    hooks: GenerationHooks = NO_HOOKS,
) -> tuple[torch.Tensor, ArCost]:
    """Tokens (B, N, D) for the prompts' text states ``text`` (B, L, E), ``len(plan)`` AR iterations with
    ``plan[k]`` head steps at iteration k; ``empty_text`` (1, L, E) is the unconditional prompt."""
    batch = text.shape[0]
    num_tokens, token_dim = transformer.config.num_tokens, transformer.config.token_dim
    counts = tokens_per_iteration(num_tokens, len(plan))
    device, dtype = text.device, text.dtype
    tokens = torch.zeros(batch, num_tokens, token_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    orders = torch.stack([torch.randperm(num_tokens, generator=g) for g in generators]).to(device)
    step_noise = [torch.Generator().manual_seed(generators[0].initial_seed() ^ 0x5DEECE66D)]  # draws nothing
    cost = ArCost(head_steps=list(plan), tokens=counts)
    head_counters = LoopCounters()
    rows = torch.arange(batch, device=device)[:, None]
    done = 0
    start = time.perf_counter()
    for k, (count, steps) in enumerate(zip(counts, plan, strict=True)):
        hooks.check_cancel(k, len(plan))
        guidance = make_guidance()
        t0 = time.perf_counter()
        if guidance.needs_uncond:
            z_all = transformer(torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                                torch.cat([text, empty_text.expand_as(text)]))
            z_cond, z_uncond = z_all.chunk(2)
            cost.transformer_nfe += 2
        else:
            z_cond, z_uncond = transformer(tokens, mask, text), None
            cost.transformer_nfe += 1
        t1 = time.perf_counter()
        positions = orders[:, done : done + count]  # (B, count)
        z = {COND: z_cond[rows, positions].flatten(0, 1)}
        if z_uncond is not None:
            z[UNCOND] = z_uncond[rows, positions].flatten(0, 1)
        noise = torch.cat([torch.randn(count, token_dim, generator=g) for g in generators]).to(device, dtype)
        nfe_before = head_counters.nfe
        sampled = sample_head(head, z, noise, sampler, head_scheduler_config, steps, guidance, step_noise,
                              head_counters)
        cost.head_token_evals += count * (head_counters.nfe - nfe_before)
        tokens[rows, positions] = sampled.unflatten(0, (batch, count))
        mask[rows, positions] = False
        done += count
        cost.transformer_seconds += t1 - t0
        cost.head_seconds += time.perf_counter() - t1
        if hooks.on_step is not None:
            hooks.on_step(StepEvent(k + 1, len(plan), float(k), time.perf_counter() - start))
    cost.head_nfe = head_counters.nfe
    return tokens, cost
