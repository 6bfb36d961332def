"""The one distillation loop shared by every student method: seeded, EMA, progress, evaluation, resumable.

A method (``fdistill.FDistill``, ...) owns its networks, optimizers and one training iteration
(``train_step``); :func:`train` owns everything around it:

- one ``torch.Generator`` seeded from ``TrainConfig.seed`` draws every random number of the run;
- an EMA copy of the student, updated after every iteration that changed the student;
- a tqdm progress bar showing the current losses;
- ``evaluate(student)`` every ``eval_every`` iterations (the eval sticks: MMD, mode weights, ...), kept in
  the history;
- a checkpoint every ``checkpoint_every`` iterations, written atomically (a kill during the write leaves
  the previous one): the networks, optimizers, EMA, the method's own state, the generator's state and the
  history. ``train`` on an ``out_dir`` that holds a checkpoint resumes from it, and the result is the
  same, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

CHECKPOINT_NAME = "checkpoint.pt"


class TrainConfig(BaseModel):
    """What every run has: budget, seed, EMA, and how often to evaluate and checkpoint (0 = never)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(ge=1, description="training iterations (generator and critic updates together)")
    seed: int = Field(0, ge=0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    progress: bool = True


class DistillationMethod(Protocol):
    """What :func:`train` needs from a method."""

    student: nn.Module

    def modules(self) -> dict[str, nn.Module]:
        """Every trained network by name (the student included)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimizer by name."""

    def train_step(self, iteration: int, rng: torch.Generator) -> dict[str, float]:
        """One iteration; every random number from ``rng``. Returns the losses to show (the key
        ``student_updated`` = 1.0 marks an iteration that changed the student)."""

    def extra_state(self) -> dict[str, Any]:
        """Tensors/numbers outside the networks that a resume needs (e.g. f-distill's ratio bins)."""

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""


class NoExtraState:
    """For a :class:`DistillationMethod` whose resume needs nothing beyond its networks and optimizers."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, module: nn.Module | None = None,
                   grad_clip: float = 0.0) -> None:
    """One update: zero the gradients, backpropagate ``loss``, clip ``module``'s gradient norm to ``grad_clip``
    (when both are given), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if module is not None and grad_clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    optimizer.step()


@dataclass
class TrainResult:
    """The trained student, its EMA, the history of evaluations and the wall time of this process."""

    student: nn.Module
    ema: nn.Module
    iterations: int
    history: list[dict[str, Any]] = field(default_factory=list)
    last_losses: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    resumed_from: int = 0
    ema_updates: int = 0


class StopTraining(Exception):
    """Raised by an ``on_iteration`` callback to end a run early (tests use it as a kill)."""


def _ema_update(ema: nn.Module, model: nn.Module, decay: float, updates: int) -> None:
    """EMA step ``updates`` (0-based), with warmup: decay min(decay, (1 + n) / (10 + n))."""
    decay = min(decay, (1 + updates) / (10 + updates))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(b)


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def train(
    method: DistillationMethod,
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
    on_iteration: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Run ``method`` for ``config.iterations`` iterations; resume from ``out_dir``'s checkpoint if there is one.

    ``on_iteration(done, losses)`` runs after each iteration (after any checkpoint of that iteration) and
    may raise :class:`StopTraining`; then the result so far is returned (the checkpoint on disk is what a
    later run resumes from).
    """
    rng = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(method.student).requires_grad_(False)
    history: list[dict[str, Any]] = []
    start_iteration = 0
    ema_updates = 0
    path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if path is not None and resume and path.is_file():
        state = torch.load(path, weights_only=True)
        if state["seed"] != config.seed:
            raise ValueError(f"seed: the checkpoint in {str(path.parent)!r} was trained with seed {state['seed']}, "
                             f"not {config.seed}; use that seed or another --out directory")
        for name, module in method.modules().items():
            module.load_state_dict(state["modules"][name])
        for name, optimizer in method.optimizers().items():
            optimizer.load_state_dict(state["optimizers"][name])
        ema.load_state_dict(state["ema"])
        method.load_extra_state(state["extra"])
        rng.set_state(state["rng"])
        history = list(state["history"])
        start_iteration = int(state["iteration"])
        ema_updates = int(state["ema_updates"])

    def checkpoint(done: int) -> None:
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({
            "iteration": done,
            "seed": config.seed,
            "modules": {name: m.state_dict() for name, m in method.modules().items()},
            "optimizers": {name: o.state_dict() for name, o in method.optimizers().items()},
            "ema": ema.state_dict(),
            "ema_updates": result.ema_updates,
            "extra": method.extra_state(),
            "rng": rng.get_state(),
            "history": history,
        }, path)

    result = TrainResult(student=method.student, ema=ema, iterations=start_iteration, history=history,
                         resumed_from=start_iteration, ema_updates=ema_updates)
    started = time.perf_counter()
    bar = tqdm(total=config.iterations, initial=start_iteration, disable=not config.progress, desc="distill")
    try:
        for iteration in range(start_iteration, config.iterations):
            losses = method.train_step(iteration, rng)
            if losses.get("student_updated", 0.0):
                _ema_update(ema, method.student, config.ema_decay, result.ema_updates)
                result.ema_updates += 1
            done = iteration + 1
            result.iterations = done
            result.last_losses = losses
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items() if k != "student_updated"}, refresh=False)
            if evaluate is not None and config.eval_every and done % config.eval_every == 0:
                history.append({"iteration": done, **evaluate(ema)})
                bar.write(f"iteration {done}: {history[-1]}", file=sys.stderr)
            if path is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                checkpoint(done)
            if on_iteration is not None:
                on_iteration(done, losses)
    except StopTraining:
        pass
    finally:
        bar.close()
    if path is not None and result.iterations == config.iterations and (
            not config.checkpoint_every or config.iterations % config.checkpoint_every):
        checkpoint(result.iterations)
    result.wall_seconds = time.perf_counter() - started
    return result
