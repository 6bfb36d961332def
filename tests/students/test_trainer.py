"""The shared distillation loop: seeded, EMA, checkpoints, and resume-after-kill equal to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accel_diffusion.students.fdistill import FDistill
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import CHECKPOINT_NAME, StopTraining, TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

SMALL = {"divergence": "js", "hidden": 32, "layers": 2, "batch_size": 64, "warmup_iterations": 10,
         "student_update_freq": 3}
CONFIG = TrainConfig(iterations=60, seed=7, checkpoint_every=20, eval_every=30, progress=False)


@pytest.fixture(scope="module")
def teacher() -> GmmTeacher:
    return GmmTeacher()


def _state(method: FDistill, result_ema: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {f"{name}.{k}": v for name, module in method.modules().items() for k, v in module.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in result_ema.state_dict().items()})
    for name, optimizer in method.optimizers().items():
        for index, entry in optimizer.state_dict()["state"].items():
            state.update({f"opt.{name}.{index}.{k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return state


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def test_same_seed_same_bits_and_another_seed_differs(teacher: GmmTeacher) -> None:
    a, b, c = FDistill(teacher, **SMALL), FDistill(teacher, **SMALL), FDistill(teacher, **SMALL)
    ra = train(a, CONFIG.model_copy(update={"checkpoint_every": 0}))
    rb = train(b, CONFIG.model_copy(update={"checkpoint_every": 0}))
    train(c, CONFIG.model_copy(update={"checkpoint_every": 0, "seed": 8}))
    _assert_identical(_state(a, ra.ema), _state(b, rb.ema))
    assert not torch.equal(a.student.net[0].weight, c.student.net[0].weight)
    assert ra.iterations == 60 and ra.ema_updates == 50 // 3  # student steps at 12, 15, ..., 57 (after warmup)
    # the EMA differs from the raw student, and evaluation did not consume the run's random numbers
    assert not torch.equal(ra.ema.net[0].weight, a.student.net[0].weight)
    assert ra.history == []  # no evaluate given


def test_stop_and_resume_equals_uninterrupted(teacher: GmmTeacher, tmp_path: Path) -> None:
    def evaluate(student: torch.nn.Module) -> dict:
        return teacher.evaluate(student, n=300)

    full = FDistill(teacher, **SMALL)
    full_result = train(full, CONFIG, out_dir=tmp_path / "full", evaluate=evaluate)

    def stop_at_50(done: int, losses: dict[str, float]) -> None:
        if done == 50:
            raise StopTraining

    first = FDistill(teacher, **SMALL)
    partial = train(first, CONFIG, out_dir=tmp_path / "cut", evaluate=evaluate, on_iteration=stop_at_50)
    assert partial.iterations == 50
    assert torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=True)["iteration"] == 40
    resumed = FDistill(teacher, **SMALL)  # a fresh process would build the method anew
    result = train(resumed, CONFIG, out_dir=tmp_path / "cut", evaluate=evaluate)
    assert result.resumed_from == 40 and result.iterations == 60
    _assert_identical(_state(full, full_result.ema), _state(resumed, result.ema))
    assert result.history == full_result.history  # evaluations at 30 (from the checkpoint) and 60
    assert result.history[1]["mmd"] > 0
    with pytest.raises(ValueError, match=r"seed: the checkpoint .* seed 7, not 8"):
        train(FDistill(teacher, **SMALL), CONFIG.model_copy(update={"seed": 8}), out_dir=tmp_path / "cut")


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, torch
    from accel_diffusion.students.fdistill import FDistill
    from accel_diffusion.students.teachers import GmmTeacher
    from accel_diffusion.students.trainer import TrainConfig, train
    small = {small!r}
    def kill_at_50(done, losses):
        if done == 50:
            os.kill(os.getpid(), signal.SIGKILL)
    train(FDistill(GmmTeacher(), **small), TrainConfig.model_validate({config!r}), out_dir=sys.argv[1],
          on_iteration=kill_at_50)
""")


def test_resume_after_sigkill_equals_uninterrupted(teacher: GmmTeacher, tmp_path: Path) -> None:
    """A real kill -9 of a training process at iteration 50; the resumed run ends on the uninterrupted bits."""
    code = KILLED_RUN.format(small=SMALL, config=CONFIG.model_dump())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "killed")], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert torch.load(tmp_path / "killed" / CHECKPOINT_NAME, weights_only=True)["iteration"] == 40
    assert not (tmp_path / "killed" / (CHECKPOINT_NAME + ".tmp")).exists()
    resumed = FDistill(teacher, **SMALL)
    result = train(resumed, CONFIG, out_dir=tmp_path / "killed")
    full = FDistill(teacher, **SMALL)
    full_result = train(full, CONFIG)
    assert result.resumed_from == 40
    _assert_identical(_state(full, full_result.ema), _state(resumed, result.ema))
