"""The diffusion head (ar/head.py) against known answers: its loss on a Gaussian (the analytic minimum), the
engine's samplers driving an exact head on the gmm-style mixture, and a trained head reproducing a 2-D mixture
within a stated MMD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from accel_diffusion.ar.head import HEAD_NOISE, DiffusionHead, head_loss, head_noise_scheduler
from accel_diffusion.ar.sampling import sample_head
from accel_diffusion.engine.hooks import LoopCounters
from accel_diffusion.eval.gmm_metrics import mmd_rbf, mode_weights
from accel_diffusion.guidance.none import NoGuidance
from accel_diffusion.models.gmm import GaussianMixture
from accel_diffusion.registry import get_registry

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: a second thread only adds contention

# three well separated modes, unequal weights (the head's target in the sampler tests)
MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]], [[[0.09, 0.0], [0.0, 0.09]]] * 3)
MIXTURE_WEIGHTS = [0.5, 0.3, 0.2]


class GaussianVHead(nn.Module):
    """The exact v-prediction for data N(mu, s^2 I) on the head's noise process (float64)."""

    def __init__(self, mu: torch.Tensor, s: float) -> None:
        super().__init__()
        self.mu, self.s = mu, s
        self.acp = head_noise_scheduler().alphas_cumprod.double()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor, return_dict: bool = True):
        ab = self.acp[torch.as_tensor(timestep).long()].reshape(-1, 1).to(sample.dtype)
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        x0_mean = self.mu + a * self.s**2 * (sample - a * self.mu) / (ab * self.s**2 + sig**2)
        return ((a * sample - x0_mean) / sig,)


class MixtureVHead(nn.Module):
    """The exact v-prediction of MIXTURE: v = (eps - sigma x) / alpha from the oracle's exact eps (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.acp = head_noise_scheduler().alphas_cumprod.double()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, z: torch.Tensor, return_dict: bool = True):
        ab = self.acp[int(timestep)]
        a, sig = ab.sqrt(), (1 - ab).sqrt()
        x64 = sample.double()
        eps = MIXTURE.eps(x64, a, sig)
        return (((eps - sig * x64) / a).to(sample.dtype),)


def test_loss_of_the_exact_head_is_the_analytic_minimum() -> None:
    """Data N(mu, s^2 I): the best v-prediction leaves Var(v | x_t) = s^2 / (alpha^2 s^2 + sigma^2) per dimension,
    so head_loss of the exact predictor is that, averaged over the 1000 timesteps (s = 1: exactly 1)."""
    gen = torch.Generator().manual_seed(0)
    sched = head_noise_scheduler()
    acp = sched.alphas_cumprod.double()
    for s in (1.0, 0.5):
        mu = torch.tensor([0.7, -0.4], dtype=torch.float64)
        tokens = mu + s * torch.randn(100_000, 2, generator=gen, dtype=torch.float64)
        loss = head_loss(GaussianVHead(mu, s), tokens, torch.zeros(100_000, 1), sched, gen, repeats=1)
        expected = float((s**2 / (acp * s**2 + (1 - acp))).mean())
        assert float(loss) == pytest.approx(expected, rel=0.02), s
    assert expected == pytest.approx(0.4957, abs=1e-3)  # s = 0.5: 1 at t = 0 down to s^2 = 0.25 at t = 999


@pytest.mark.parametrize(("sampler", "steps", "max_mmd"), [("ddpm", 200, 0.003), ("ddim", 100, 0.003)])
def test_engine_samplers_on_the_exact_head_reproduce_the_mixture(sampler: str, steps: int, max_mmd: float) -> None:
    """The head's inner loop is the engine's: DDPM (ancestral) and DDIM over the head's cosine noise process,
    driving the exact mixture predictor, land on the mixture (two fresh real sample sets: MMD ~0.000)."""
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counters = LoopCounters()
    gens = [torch.Generator().manual_seed(2)] if sampler == "ddpm" else None
    out = sample_head(MixtureVHead(), {"cond": torch.zeros(n, 1)}, noise, get_registry().build("sampler", sampler),
                      dict(HEAD_NOISE), steps, NoGuidance(), gens, counters)
    real = MIXTURE.sample(n, generator=torch.Generator().manual_seed(3))
    assert counters.nfe == steps
    assert mmd_rbf(out, real) < max_mmd
    assert mode_weights(out, MIXTURE) == pytest.approx(MIXTURE_WEIGHTS, abs=0.03)


def test_trained_head_reproduces_a_2d_mixture() -> None:
    """head_loss trains a small head on MIXTURE; DDPM at 100 steps then reproduces it: MMD < 0.01 and mode
    weights within 0.04 (measured: MMD 0.0005 after 800 steps of a width-128 head; a 20-step run is worse)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=4, width=64, depth=2)
    sched = head_noise_scheduler()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    steps = 500
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        loss = head_loss(head, MIXTURE.sample(256, generator=gen).float(), torch.zeros(256, 4), sched, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    head.eval()
    n = 2000
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    sampler = get_registry().build("sampler", "ddpm")
    with torch.no_grad():
        out = sample_head(head, {"cond": torch.zeros(n, 4)}, noise, sampler, dict(HEAD_NOISE), 100, NoGuidance(),
                          [torch.Generator().manual_seed(2)])
        few = sample_head(head, {"cond": torch.zeros(n, 4)}, noise, sampler, dict(HEAD_NOISE), 5, NoGuidance(),
                          [torch.Generator().manual_seed(2)])
    real = MIXTURE.sample(n, generator=torch.Generator().manual_seed(3))
    mmd = mmd_rbf(out, real)
    assert mmd < 0.01
    assert mode_weights(out.double(), MIXTURE) == pytest.approx(MIXTURE_WEIGHTS, abs=0.04)
    assert mmd_rbf(few, real) > mmd  # fewer steps, farther from the target
    assert math.isfinite(float(loss.detach()))
