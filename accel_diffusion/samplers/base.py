"""Sampler components: each builds a fresh diffusers scheduler for one generation."""

from __future__ import annotations

import copy
import functools
import inspect
import json
from abc import ABC, abstractmethod
from typing import Any

from diffusers import SchedulerMixin


class Sampler(ABC):
    """How x_t moves to x_{t-1}: a factory of per-generation scheduler instances.

    A new scheduler is built for every generation, so no state (multistep history, momentum) can
    leak between requests that run at the same time.
    """

    @abstractmethod
    def make_scheduler(
        self, model_scheduler_config: dict[str, Any], schedule_options: dict[str, Any]
    ) -> SchedulerMixin:
        """A new scheduler: the model's noise process, this sampler's solver settings, and the
        schedule component's options (``timestep_spacing``, ``use_karras_sigmas``, ...)."""

    def step_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for ``scheduler.step`` (e.g. DDIM's ``eta``)."""
        return {}


# The keys of a scheduler config that describe the *model's* training noise process. Only these are
# carried over from the model's scheduler; solver settings come from the sampler component itself.
NOISE_PROCESS_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "steps_offset",
    "timestep_spacing",
    "rescale_betas_zero_snr",
)


def noise_process_config(model_scheduler_config: dict[str, Any]) -> dict[str, Any]:
    return {k: model_scheduler_config[k] for k in NOISE_PROCESS_KEYS if k in model_scheduler_config}


def build_scheduler(
    cls: type[SchedulerMixin],
    model_scheduler_config: dict[str, Any],
    schedule_options: dict[str, Any],
    **solver_settings: Any,
) -> SchedulerMixin:
    """``cls`` on the model's noise process, with the schedule's options that ``cls`` takes and the
    sampler's own settings (a schedule may offer options only some schedulers know).

    A fresh instance every call (a scheduler carries one generation's state), copied from a prototype built
    once per class and configuration: diffusers' ``from_config`` inspects the signatures of every compatible
    scheduler class on each call (~1 ms, most of a one-step image's preparation)."""
    options = {k: v for k, v in schedule_options.items() if k in _init_parameters(cls)}
    config = noise_process_config(model_scheduler_config) | options
    key = (cls, json.dumps([config, solver_settings], sort_keys=True, default=repr))
    prototype = _PROTOTYPES.get(key)
    if prototype is None:
        prototype = cls.from_config(config, **solver_settings)
        if len(_PROTOTYPES) >= MAX_PROTOTYPES:
            _PROTOTYPES.clear()
        _PROTOTYPES[key] = prototype
    return copy.deepcopy(prototype)


MAX_PROTOTYPES = 256
_PROTOTYPES: dict[tuple[type, str], SchedulerMixin] = {}


@functools.cache
def _init_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)
