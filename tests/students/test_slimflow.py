"""SlimFlow on the gmm oracle: exact teacher pairs, annealing reflow, flow-guided distillation (acceptance line 4).

Documented bound (measured at the commit, 4,000 exact PF-ODE pairs, MLP 3×64 velocity, 1,500 reflow
iterations with β annealed linearly to 0 over the first 750, then 500 distillation iterations): the one-step
student's MMD² ≤ 0.03 (measured 0.0211; the 2-RF's own 1-step MMD² 0.0311; exact pairs −0.001) and every mode
weight within 0.03 (measured 0.019). On this 2-D oracle pure reflow (β ≡ 0) is as good (0.0214 → 0.0159):
annealing matters for small students of image models (spec §3.2), not here.
"""

from __future__ import annotations

import math

import pytest
import torch

from accel_diffusion.students.slimflow import (
    AnnealingReflow,
    FlowGenerator,
    FlowGuidedDistillation,
    annealing_beta,
    teacher_pairs,
)
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

NET = {"dim": 2, "hidden": 64, "layers": 3, "num_train_timesteps": 1000}


def test_annealing_schedules() -> None:
    assert [annealing_beta("linear", k, 100) for k in (0, 25, 100, 500)] == [1.0, 0.75, 0.0, 0.0]
    assert annealing_beta("exp", 100, 100) == pytest.approx(math.exp(-1))
    assert [annealing_beta("cos", k, 100) for k in (0, 50, 100, 200)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert annealing_beta("fixed", 7, 100, b=0.3) == 0.3
    with pytest.raises(ValueError, match="schedule: unknown 'step'"):
        annealing_beta("step", 0, 10)


def test_slimflow_student_meets_the_documented_bound() -> None:
    teacher = GmmTeacher()
    rng = torch.Generator().manual_seed(0)
    pairs = teacher_pairs(teacher, 4000, rng)
    reflow = AnnealingReflow(pairs, NET, schedule="linear", horizon=750)
    seen_beta = []
    result = train(reflow, TrainConfig(iterations=1500, seed=0, ema_decay=0.99, progress=False),
                   on_iteration=lambda done, losses: seen_beta.append(losses["beta"]))
    assert seen_beta[0] == 1.0 and seen_beta[375] == 0.5 and seen_beta[-1] == 0.0  # ends on pure pairs
    reflow_mmd = teacher.evaluate(FlowGenerator.from_velocity(result.ema))["mmd"]
    distill = FlowGuidedDistillation(pairs, result.ema)
    assert torch.equal(distill.velocity.head.weight, result.ema.head.weight)  # the student starts as the 2-RF
    student = train(distill, TrainConfig(iterations=500, seed=1, ema_decay=0.99, progress=False)).ema
    measured = teacher.evaluate(student)
    assert measured["mmd"] <= 0.03 and measured["mode_weight_error"] <= 0.03, measured
    assert measured["mmd"] < reflow_mmd, (measured, reflow_mmd)  # distillation improves the 1-step samples
    assert not torch.equal(distill.guide.head.weight, distill.velocity.head.weight)  # the guide stayed frozen
    assert torch.equal(distill.guide.head.weight, result.ema.head.weight)
