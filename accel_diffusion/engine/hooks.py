"""Per-generation hooks: step progress, previews and cooperative cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from accel_diffusion.errors import GenerationCancelled


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based number of the step just finished
    total: int
    timestep: float
    elapsed_s: float


@dataclass
class GenerationHooks:
    """Callbacks the engine calls from the thread running the generation.

    ``cancel`` is a ``threading.Event`` or a callable returning True once the generation should stop;
    the engine checks it before every model call and raises ``GenerationCancelled``.
    ``on_preview`` receives decoded float images (N, H, W, 3) in [0, 1] every ``preview_every``
    steps (``GenerationRequest.preview_every``), which costs one decode each time: with the model's
    tiny autoencoder when it has one (``tiny_vae``), else with the request's autoencoder.
    """

    on_step: Callable[[StepEvent], None] | None = None
    on_preview: Callable[[int, np.ndarray], None] | None = None
    cancel: threading.Event | Callable[[], bool] | None = None

    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        if isinstance(self.cancel, threading.Event):
            return self.cancel.is_set()
        return bool(self.cancel())

    def check_cancel(self, step: int, total: int) -> None:
        if self.cancelled():
            raise GenerationCancelled(step, total)


NO_HOOKS = GenerationHooks()


@dataclass
class LoopCounters:
    """Cost of a generation: NFE per image (every branch counted) and batched forward passes."""

    nfe: int = 0
    forward_passes: int = 0

