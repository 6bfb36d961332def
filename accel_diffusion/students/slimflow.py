"""SlimFlow: small one-step students with rectified flow (Zhu, Liu, Liu; ECCV 2024, arXiv 2407.12718).

Spec: ``specs/students-parallel-stream.md`` §3. Conventions of the reference code: ``x_t = t·x1 + (1 − t)·x0``
with x0 the noise and x1 the data, velocity target ``x1 − x0``, t ∈ [eps, 1], the network called at t·999, and
one-step sampling ``x1 = z + v(z, eps)``.

- :func:`teacher_pairs`: (z, x1 = the teacher's ODE endpoint of z) — on ``gmm`` the exact PF-ODE;
- :func:`annealing_beta`: the noise-pairing schedule β_k (``linear`` = warmup_K, ``exp``, ``cos``, ``fixed``);
- :class:`AnnealingReflow`: a small 2-RF trained on the pairs with the annealed noise
  ``z̃ = sqrt(1 − β²)·z + β·ε`` (β = 1: random pairing, an easy 1-RF problem; β = 0: pure reflow pairs);
- :class:`FlowGuidedDistillation`: the student starts as the 2-RF; loss = pair term
  ``D(z + v_s(z, eps), x1)`` + guided term ``D(z + v_s, x_{t'} + (1 − t')·v_2RF(x_{t'}, t'))`` with
  ``x_{t'} = z + t'·sg(v_s)``, t' ~ U[0.2, 0.8] (a 2-step target whose first step is the student's); D = L2.

Both stages see the network through a flow parameterization: :class:`VelocityFlow` (the reference's, for the
``gmm`` MLPs) or :class:`ShapesDataFlow` (a small text-conditioned ``UNet2DConditionModel`` predicting the data
end x1 at diffusers timestep ``(1 − t)·999``, so that its one step from pure noise is a plain diffusers
DDIM step with ``prediction_type="sample"`` at t = 999; its velocity is ``(x1̂ − x_t)/(1 − t)``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from accel_diffusion.students.networks import MlpDenoiser, StudentOutput
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import NoExtraState

EPS = 1e-3
SCHEDULES = ("linear", "exp", "cos", "fixed")


def teacher_pairs(teacher: GmmTeacher, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n noises z ~ N(0, I) (the VP sample at the top timestep) and their exact PF-ODE endpoints, float32."""
    z = torch.randn(n, teacher.dim, generator=rng, dtype=torch.float64)
    rho = float(teacher.denoiser.timestep_to_rho(teacher.num_train_timesteps - 1))
    x1 = teacher.mixture.pf_ode_endpoint(z, rho, 0.0, rtol=1e-7, atol=1e-9)
    return z.float(), torch.as_tensor(x1).float()


def annealing_beta(kind: str, k: int, horizon: int, b: float = 0.0) -> float:
    """β_k of the annealed pairing: 1 = random noise, 0 = the teacher's pairs (spec §3.3)."""
    if kind == "linear":
        return 1.0 - min(1.0, k / horizon)
    if kind == "exp":
        return math.exp(-k / horizon)
    if kind == "cos":
        return (1.0 + math.cos(math.pi * min(1.0, k / horizon))) / 2.0
    if kind == "fixed":
        return b
    raise ValueError(f"schedule: unknown {kind!r} (allowed: {', '.join(SCHEDULES)})")


class FlowGenerator(ModelMixin, ConfigMixin):
    """The one-step sampler of a velocity network: ``G(z) = z + v(z, eps)``, called like :class:`MlpGenerator`.

    Its config is the velocity network's, so it saves and loads with ``save_pretrained``/``from_pretrained``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, embed_dim: int = 32,
                 num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.velocity = MlpDenoiser(dim=dim, hidden=hidden, layers=layers, embed_dim=embed_dim,
                                    num_train_timesteps=num_train_timesteps)

    @classmethod
    def from_velocity(cls, velocity: MlpDenoiser) -> FlowGenerator:
        """A generator sharing ``velocity``'s weights (the module itself, not a copy)."""
        generator = cls(**{k: velocity.config[k] for k in ("dim", "hidden", "layers", "embed_dim",
                                                           "num_train_timesteps")})
        generator.velocity = velocity
        return generator

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int | None = None,
                return_dict: bool = True) -> StudentOutput | tuple[torch.Tensor]:
        z = sample.float()
        t = torch.full((z.shape[0],), EPS * 999, device=z.device)
        out = (z + self.velocity(z, t).sample).to(sample.dtype)
        return StudentOutput(sample=out) if return_dict else (out,)


def _per_row(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (B,) shaped to broadcast against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class VelocityFlow:
    """The reference convention: the network's output at timestep t·999 is the velocity; t ∈ [eps, 1];
    one step ``x1 = z + v(z, eps)``; no conditioning (``cond`` is None)."""

    t_low, t_high = EPS, 1.0

    def build(self, network_config: dict[str, Any]) -> nn.Module:
        return MlpDenoiser(**network_config)

    def velocity(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return network(x, t * 999).sample

    def one_step(self, network: nn.Module, z: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return z + self.velocity(network, z, torch.full((z.shape[0],), EPS), cond)

    def loss(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any, x1: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """The reference's flow-matching loss: L2 on the velocity, uniform in t."""
        return F.mse_loss(self.velocity(network, x_t, t, cond), x1 - noise)

    def random_cond(self, n: int, rng: torch.Generator) -> Any:
        return None

    def generator(self, network: nn.Module) -> nn.Module:
        return FlowGenerator.from_velocity(network)


class ShapesDataFlow:
    """A text-conditioned ``UNet2DConditionModel`` that predicts the data end: ``x1̂ = net(x_t, (1 − t)·999,
    text[cond])`` for t ∈ [0, 1 − eps]; velocity ``(x1̂ − x_t) / max(1 − t, min_gap)``; one step = ``net(z, 999)``.
    ``cond`` is a batch of prompt indices into ``text`` (P, L, D)."""

    t_low, t_high = 0.0, 1.0 - EPS

    def __init__(self, text: torch.Tensor, min_gap: float = 0.05) -> None:
        self.text, self.min_gap = text, float(min_gap)

    def build(self, network_config: dict[str, Any]) -> nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**network_config)

    def data(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return network(x, (1 - t) * 999, encoder_hidden_states=self.text[cond]).sample

    def velocity(self, network: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (self.data(network, x, t, cond) - x) / _per_row((1 - t).clamp_min(self.min_gap), x)

    def one_step(self, network: nn.Module, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.data(network, z, torch.zeros(z.shape[0]), cond)

    def loss(self, network: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, x1: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
        """L2 on the data end: the velocity loss weighted by (1 − t)², which keeps the weight of the noisy end
        (where the one-step student lives) instead of multiplying the near-data end's by up to 1/min_gap²."""
        return F.mse_loss(self.data(network, x_t, t, cond), x1)

    def random_cond(self, n: int, rng: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.text.shape[0], (n,), generator=rng)

    def generator(self, network: nn.Module) -> nn.Module:
        return network


Flow = VelocityFlow | ShapesDataFlow


class AnnealingReflow(NoExtraState):
    """Stage 1 for :func:`~accel_diffusion.students.trainer.train`: a small 2-RF on annealed teacher pairs.

    ``pairs`` is ``(z, x1)`` or, for a conditional flow, ``(z, x1, cond)`` (the prompt index of each pair)."""

    def __init__(self, pairs: tuple[torch.Tensor, ...], network_config: dict[str, Any], *,
                 schedule: str = "linear", horizon: int = 500, beta: float = 0.0, batch_size: int = 256,
                 lr: float = 2e-3, grad_clip: float = 1.0, init_seed: int = 0, flow: Flow | None = None) -> None:
        annealing_beta(schedule, 0, max(horizon, 1), beta)
        self.flow = flow or VelocityFlow()
        self.config: dict[str, Any] = {"schedule": schedule, "horizon": horizon, "beta": beta,
                                       "batch_size": batch_size, "lr": lr, "grad_clip": grad_clip,
                                       "pairs": int(pairs[0].shape[0]), "network": network_config,
                                       "flow": type(self.flow).__name__}
        self.z, self.x1 = pairs[0], pairs[1]
        self.cond = pairs[2] if len(pairs) > 2 else None
        self.schedule, self.horizon, self.beta = schedule, horizon, beta
        self.batch_size, self.grad_clip = batch_size, grad_clip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.student = self.flow.build(network_config)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=lr, foreach=True)

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        index = torch.randint(0, self.z.shape[0], (self.batch_size,), generator=rng)
        z, x1 = self.z[index], self.x1[index]
        cond = None if self.cond is None else self.cond[index]
        beta = annealing_beta(self.schedule, iteration, max(self.horizon, 1), self.beta)
        noise = math.sqrt(1.0 - beta * beta) * z + beta * torch.randn(z.shape, generator=rng)
        low, high = self.flow.t_low, self.flow.t_high
        t = low + (high - low) * torch.rand(self.batch_size, generator=rng)
        x_t = _per_row(t, x1) * x1 + (1 - _per_row(t, x1)) * noise
        loss = self.flow.loss(self.student, x_t, t, cond, x1, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"student_updated": 1.0, "loss_flow": float(loss.detach()), "beta": beta}


class FlowGuidedDistillation(NoExtraState):
    """Stage 2: distil the 2-RF into a one-step student (initialised from it) with pair + guided L2 terms."""

    def __init__(self, pairs: tuple[torch.Tensor, ...], reflow: nn.Module, *, guided_weight: float = 1.0,
                 batch_size: int = 256, lr: float = 1e-3, grad_clip: float = 1.0, flow: Flow | None = None) -> None:
        self.flow = flow or VelocityFlow()
        self.config: dict[str, Any] = {"guided_weight": guided_weight, "batch_size": batch_size, "lr": lr,
                                       "grad_clip": grad_clip, "flow": type(self.flow).__name__}
        self.z, self.x1 = pairs[0], pairs[1]
        self.cond = pairs[2] if len(pairs) > 2 else None
        self.guide = copy.deepcopy(reflow).requires_grad_(False)
        self.velocity = copy.deepcopy(reflow).requires_grad_(True)
        self.student = self.flow.generator(self.velocity)
        self.guided_weight, self.batch_size, self.grad_clip = guided_weight, batch_size, grad_clip
        self.optimizer = torch.optim.Adam(self.velocity.parameters(), lr=lr, foreach=True)

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.optimizer}

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        index = torch.randint(0, self.z.shape[0], (self.batch_size,), generator=rng)
        cond = None if self.cond is None else self.cond[index]
        loss_pair = F.mse_loss(self.flow.one_step(self.velocity, self.z[index], cond), self.x1[index])
        z = torch.randn(self.batch_size, *self.z.shape[1:], generator=rng)
        cond = self.flow.random_cond(self.batch_size, rng)
        x1_s = self.flow.one_step(self.velocity, z, cond)
        t = 0.2 + 0.6 * torch.rand(self.batch_size, generator=rng)
        with torch.no_grad():
            x_t = z + _per_row(t, z) * (x1_s.detach() - z)
            target = x_t + (1 - _per_row(t, z)) * self.flow.velocity(self.guide, x_t, t, cond)
        loss_guided = F.mse_loss(x1_s, target)
        loss = loss_pair + self.guided_weight * loss_guided
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.velocity.parameters(), self.grad_clip)
        self.optimizer.step()
        return {"student_updated": 1.0, "loss_pair": float(loss_pair.detach()),
                "loss_guided": float(loss_guided.detach())}
