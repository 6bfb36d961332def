"""DisBack: distribution backtracking for one-step distillation (Zhang et al., arXiv 2408.15991, ICLR 2025).

Spec: ``specs/students-parallel-stream.md`` §2. Score distillation matches the student against the teacher's
score from the first iteration, where the student's samples are far from the teacher's data and its score
there is unreliable. DisBack first records how the teacher degrades toward the initial student, then walks
that path back:

- stage 1, :func:`record_degradation`: a copy of the teacher network (``s'_0`` = teacher) is trained by
  denoising score matching on samples of the frozen initial student ``G0``; a checkpoint every ``interval``
  iterations gives the path ``[s'_0, s'_1, ..., s'_N]`` (``s'_N`` ≈ the score of G0's distribution);
- stage 2, :class:`DisBack`: the fake score starts at ``s'_N`` (already fitted to G0), and the student is
  distilled (DMD/VSD loss, ``fdistill.generator_gradient`` with h ≡ 1) against ``s'_{N−1}``, then
  ``s'_{N−2}``, ... one node every ``interval`` generator steps, and the teacher ``s'_0`` from then on.

The switching rule is the modulo rule the released README meant (spec §2.6): target index
``N − min(N, 1 + steps // interval)`` for ``N ≥ 1``. With a path of one node (the teacher) this is plain
DMD from the same initialisation: the baseline.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accel_diffusion.students.fdistill import generator_gradient
from accel_diffusion.students.networks import MlpDenoiser, MlpGenerator
from accel_diffusion.students.teachers import Teacher, noised
from accel_diffusion.students.trainer import optimizer_step


def fit_denoiser(teacher: Teacher, network: MlpDenoiser, iterations: int, rng: torch.Generator,
                 batch_size: int = 256, lr: float = 1e-3) -> MlpDenoiser:
    """Regress ``network`` onto the teacher's x0-prediction on noised data (a network teacher with weights)."""
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, foreach=True)
    for _ in range(iterations):
        x_t, t = noised(teacher, teacher.sample_data(batch_size, rng), rng)
        optimizer_step(optimizer, F.mse_loss(network(x_t, t).sample, teacher.x0(x_t, t)))
    return network.requires_grad_(False)


def record_degradation(teacher_network: MlpDenoiser, initial_student: nn.Module, teacher: Teacher, *,
                       iterations: int, interval: int, rng: torch.Generator, batch_size: int = 256,
                       lr: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    """Stage 1: the path ``[s'_0 = teacher, s'_interval, s'_2·interval, ...]`` as state dicts (copies).

    A copy that STARTS at the teacher (spec §2.6) is trained by DSM on samples of the frozen ``initial_student``.
    """
    if interval < 1 or iterations < interval:
        raise ValueError(f"interval: need 1 <= interval <= iterations, got {interval} and {iterations}")
    degraded = copy.deepcopy(teacher_network).requires_grad_(True)
    optimizer = torch.optim.Adam(degraded.parameters(), lr=lr, foreach=True)
    path = [copy.deepcopy(teacher_network.state_dict())]
    for it in range(1, iterations + 1):
        z = torch.randn(batch_size, teacher.dim, generator=rng)
        with torch.no_grad():
            x0 = initial_student(z).sample
        x_t, t = noised(teacher, x0, rng)
        optimizer_step(optimizer, F.mse_loss(degraded(x_t, t).sample, x0))
        if it % interval == 0:
            path.append(copy.deepcopy(degraded.state_dict()))
    return path


def target_index(generator_steps: int, nodes: int, interval: int) -> int:
    """Index into the path (``nodes`` = N + 1 entries, 0 = teacher) of the target after ``generator_steps``."""
    n = nodes - 1
    if n == 0:
        return 0
    return n - min(n, 1 + generator_steps // interval)


class DisBack:
    """Stage 2 on a :class:`~accel_diffusion.students.teachers.Teacher` (schedule and timesteps) and a recorded path.

    ``student`` starts as a copy of ``initial_student``; the fake score as ``s'_N``; the target network is
    loaded from the path by :func:`target_index`. Iteration k updates the student when
    ``k % student_update_freq == 0``, else the fake score (DSM on student samples).
    """

    def __init__(self, teacher: Teacher, path: list[dict[str, torch.Tensor]], initial_student: MlpGenerator,
                 network_config: dict[str, Any], *, interval: int = 100, batch_size: int = 256,
                 student_update_freq: int = 3, lr_student: float = 1e-3, lr_fake: float = 1e-3,
                 betas: tuple[float, float] = (0.0, 0.99), grad_clip: float = 1.0) -> None:
        if not path:
            raise ValueError("path: needs at least the teacher's state")
        if interval < 1:
            raise ValueError(f"interval: must be >= 1, got {interval}")
        self.config: dict[str, Any] = {"nodes": len(path), "interval": interval, "batch_size": batch_size,
                                       "student_update_freq": student_update_freq, "lr_student": lr_student,
                                       "lr_fake": lr_fake, "betas": list(betas), "grad_clip": grad_clip}
        self.teacher, self.path, self.interval = teacher, path, interval
        self.batch_size, self.student_update_freq, self.grad_clip = batch_size, student_update_freq, grad_clip
        self.student = copy.deepcopy(initial_student).requires_grad_(True)
        self.fake_score = MlpDenoiser(**network_config)
        self.fake_score.load_state_dict(path[-1])
        self.target = MlpDenoiser(**network_config).requires_grad_(False)
        self.generator_steps = 0
        self.loaded_index = -1
        self._load_target()
        self._optimizers = {
            "student": torch.optim.Adam(self.student.parameters(), lr=lr_student, betas=betas, foreach=True),
            "fake_score": torch.optim.Adam(self.fake_score.parameters(), lr=lr_fake, betas=betas, foreach=True),
        }

    def _load_target(self) -> None:
        index = target_index(self.generator_steps, len(self.path), self.interval)
        if index != self.loaded_index:
            missing, unexpected = self.target.load_state_dict(self.path[index], strict=True)
            assert not missing and not unexpected
            self.loaded_index = index

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "fake_score": self.fake_score}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def extra_state(self) -> dict[str, Any]:
        return {"generator_steps": self.generator_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator_steps = int(state["generator_steps"])
        self._load_target()

    def _noised(self, x0: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return noised(self.teacher, x0, rng)

    def _step(self, name: str, loss: torch.Tensor, module: nn.Module) -> None:
        optimizer_step(self._optimizers[name], loss, module, self.grad_clip)

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        z = torch.randn(self.batch_size, self.teacher.dim, generator=rng)
        if iteration % self.student_update_freq == 0:
            self._load_target()
            x = self.student(z).sample
            x_t, t = self._noised(x.detach(), rng)
            with torch.no_grad():
                target_x0 = self.target(x_t, t).sample
                fake_x0 = self.fake_score(x_t, t).sample
                grad = generator_gradient(torch.ones(x.shape[0]), x.detach(), target_x0, fake_x0)
            loss = 0.5 * F.mse_loss(x, (x - grad).detach())
            self._step("student", loss, self.student)
            self.generator_steps += 1
            return {"student_updated": 1.0, "loss_vsd": float(loss.detach()), "target": float(self.loaded_index)}
        with torch.no_grad():
            x = self.student(z).sample
        x_t, t = self._noised(x, rng)
        loss = F.mse_loss(self.fake_score(x_t, t).sample, x)
        self._step("fake_score", loss, self.fake_score)
        return {"loss_dsm": float(loss.detach())}


def record_shapes_degradation(teacher: Any, initial_student: nn.Module, *, iterations: int, interval: int,
                              rng: torch.Generator, batch_size: int = 32, lr: float = 1e-4,
                              progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Stage 1 on a :class:`~accel_diffusion.students.shapes.ShapesTeacher`: a copy of its UNet (``s'_0`` = the
    teacher) is trained by DSM (x0 MSE at the prompt's condition) on one-step samples of the frozen
    ``initial_student`` for random prompts; its state every ``interval`` iterations is the path."""
    if interval < 1 or iterations < interval:
        raise ValueError(f"interval: need 1 <= interval <= iterations, got {interval} and {iterations}")
    degraded = copy.deepcopy(teacher.unet).requires_grad_(True).train()
    optimizer = torch.optim.Adam(degraded.parameters(), lr=lr, betas=(0.0, 0.99))
    path = [copy.deepcopy(teacher.unet.state_dict())]
    for it in range(1, iterations + 1):
        z = torch.randn(batch_size, *teacher.latent_shape, generator=rng)
        prompt = teacher.sample_prompts(batch_size, rng)
        with torch.no_grad():
            x0 = teacher.student_x0(initial_student, z, prompt)
        x_t, t = teacher.noised(x0, rng)
        optimizer_step(optimizer, F.mse_loss(teacher.cond_x0(degraded, x_t, t, prompt), x0), degraded, 1.0)
        if it % interval == 0:
            path.append(copy.deepcopy(degraded.state_dict()))
            if progress:
                print(f"degradation {it}/{iterations}: node {len(path) - 1}", flush=True)
    return path


class ShapesDisBack(DisBack):
    """Stage 2 on a :class:`~accel_diffusion.students.shapes.ShapesTeacher` (for :func:`trainer.train`).

    The student starts as ``initial_student`` (G0), the fake score (conditional DSM on student samples) as
    ``s'_N``; every ``student_update_freq``-th iteration the student takes a DMD step (h ≡ 1, the normalized
    score difference of ``fdistill.generator_gradient``) against the path node of :func:`target_index`, guided
    with CFG at the teacher's scale as the teacher is, plus ``regression_weight`` × DMD's regression loss on the
    teacher's ODE pairs; after ``(N) · interval`` generator steps the target is the teacher itself. The walk
    along the path, the modules, optimizers and resumable state are :class:`DisBack`'s (its ``__init__`` is not
    called: the networks here are UNets copied from the teacher).
    """

    def __init__(self, teacher: Any, path: list[dict[str, torch.Tensor]], initial_student: nn.Module,
                 pairs: dict[str, torch.Tensor], *, interval: int = 20, batch_size: int = 32,
                 student_update_freq: int = 5, lr_student: float = 1e-5, lr_fake: float = 1e-4,
                 regression_weight: float = 1.0, betas: tuple[float, float] = (0.0, 0.99),
                 grad_clip: float = 1.0) -> None:
        if not path:
            raise ValueError("path: needs at least the teacher's state")
        if interval < 1:
            raise ValueError(f"interval: must be >= 1, got {interval}")
        self.config: dict[str, Any] = {
            "nodes": len(path), "interval": interval, "batch_size": batch_size,
            "student_update_freq": student_update_freq, "lr_student": lr_student, "lr_fake": lr_fake,
            "regression_weight": regression_weight, "betas": list(betas), "grad_clip": grad_clip,
            "pairs": int(pairs["z"].shape[0])}
        self.teacher, self.path, self.pairs, self.interval = teacher, path, pairs, interval
        self.batch_size, self.student_update_freq, self.grad_clip = batch_size, student_update_freq, grad_clip
        self.regression_weight = regression_weight
        self.student = copy.deepcopy(initial_student).requires_grad_(True).train()
        self.fake_score = copy.deepcopy(teacher.unet).requires_grad_(True).train()
        self.fake_score.load_state_dict(path[-1])
        self.target = copy.deepcopy(teacher.unet).requires_grad_(False).eval()
        self.generator_steps = 0
        self.loaded_index = -1
        self._load_target()
        self._optimizers = {
            "student": torch.optim.Adam(self.student.parameters(), lr=lr_student, betas=(0.9, 0.99)),
            "fake_score": torch.optim.Adam(self.fake_score.parameters(), lr=lr_fake, betas=betas),
        }

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        from accel_diffusion.students.shapes import regression_loss

        teacher = self.teacher
        z = torch.randn(self.batch_size, *teacher.latent_shape, generator=rng)
        prompt = teacher.sample_prompts(self.batch_size, rng)
        if iteration % self.student_update_freq == 0:
            self._load_target()
            x = teacher.student_x0(self.student, z, prompt)
            x_t, t = teacher.noised(x.detach(), rng)
            with torch.no_grad():
                target_x0 = teacher.x0(x_t, t, prompt, self.target)
                fake_x0 = teacher.cond_x0(self.fake_score, x_t, t, prompt)
                grad = generator_gradient(torch.ones(x.shape[0]), x.detach(), target_x0, fake_x0)
            loss_vsd = 0.5 * F.mse_loss(x, (x - grad).detach())
            loss_reg = regression_loss(teacher, self.student, self.pairs, self.batch_size, rng)
            optimizer_step(self._optimizers["student"], loss_vsd + self.regression_weight * loss_reg, self.student,
                           self.grad_clip)
            self.generator_steps += 1
            return {"student_updated": 1.0, "loss_vsd": float(loss_vsd.detach()), "loss_reg": float(loss_reg.detach()),
                    "target": float(self.loaded_index)}
        with torch.no_grad():
            x = teacher.student_x0(self.student, z, prompt)
        x_t, t = teacher.noised(x, rng)
        loss = F.mse_loss(teacher.cond_x0(self.fake_score, x_t, t, prompt), x)
        optimizer_step(self._optimizers["fake_score"], loss, self.fake_score, self.grad_clip)
        return {"loss_dsm": float(loss.detach())}
