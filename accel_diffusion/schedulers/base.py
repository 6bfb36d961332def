"""What every accel-diffusion solver shares: the VP noise process, step grids, prediction
conversions, step bookkeeping and diffusers' scheduler interface. Not a solver by itself.

A solver subclass implements two methods: ``_on_set_timesteps`` (precompute its coefficients,
reset its state) and ``_solver_step`` (one step from the canonical ε̂ / x̂0 of the current step).
All state lives on the instance and is reset by ``set_timesteps``, so two generations on one
instance equal two generations on fresh instances.

The grid (``set_timesteps``):

- ``sigmas=[...]``: N + 1 noise levels rho (diffusers' "sigmas" of a VP model), decreasing; the
  model is called at the first N, the last (may be 0) is where the trajectory ends.
- ``timesteps=[...]``: N model timesteps (integer or fractional), decreasing, in [0, T-1].
- a step count N: ``sigma_spacing`` ("uniform_t", "quadratic_t", "log_snr", "karras"; or
  ``use_karras_sigmas=True``) places N + 1 levels between rho_max and rho_min and calls the model
  at fractional timesteps; without it, diffusers' integer ``timestep_spacing`` rules are used.

``final_sigmas_type`` says where the last step ends (unless ``sigmas`` gives it): "zero" (rho = 0,
the clean sample) or "sigma_min" (rho at t = 0). Either way the last model call is followed by a
step of non-zero length: unlike diffusers' DEIS with Karras sigmas, no model call is wasted (a step
count whose integer timesteps reach t = 0 with "sigma_min" drops that call, which no step follows).

diffusers' multistep-solver keys, same meaning: ``use_exponential_sigmas`` and ``use_lu_lambdas``
(both uniform in log rho: ``sigma_spacing="log_snr"``), ``use_beta_sigmas`` ("beta"),
``lambda_min_clipped`` (the grid starts at lambda = -log rho <= it; for every grid, where diffusers
applies it to integer spacings only), ``thresholding`` (dynamic thresholding of x̂0, then ε̂ from
it), ``variance_type`` ("learned" / "learned_range": the model output carries variance channels
after the mean ones; the mean half is used) and ``euler_at_final`` (the last step is first order,
a DDIM step, for every solver).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from accel_diffusion.schedulers.noise_grid import (
    DIFFUSERS_SPACINGS,
    FINAL_SIGMAS_TYPES,
    SIGMA_SPACINGS,
    ContinuousVpTime,
    alpha_sigma_from_rho,
    diffusers_timesteps,
    sigma_grid,
    train_betas,
    unclipped_timesteps,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' (DDPM's) variance types; only the learned ones change what the model outputs
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                  "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# diffusers' sigma-grid flags and the sigma_spacing each one selects
GRID_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "log_snr", "use_lu_lambdas": "log_snr",
              "use_beta_sigmas": "beta"}
# keys whose meaning or default belongs to one solver class (dropped when another one loads its config)
SOLVER_SPECIFIC_KEYS = frozenset({"order", "variant", "beta", "base", "plms_order", "sigma_spacing"})


def _solver_of(config: Any) -> str | None:
    """Which of our solvers a config belongs to: a saved one names its class, a live ``scheduler.config``
    does not (diffusers adds ``_class_name`` on save), so its solver-only keys tell."""
    name = config.get("_class_name")
    if name in ("DeisScheduler", "HeavyBallScheduler", "GhvbScheduler"):
        return name
    if "sigma_spacing" not in config:  # not one of ours: diffusers' own rules apply
        return None
    if "variant" in config:
        return "DeisScheduler"
    if "beta" in config and "base" in config:
        return "HeavyBallScheduler"
    return "GhvbScheduler" if "order" in config else None

def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unsupported {value!r} (allowed: {', '.join(map(str, allowed))})")


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen), as diffusers' ``_threshold_sample``: per batch element, s is the
    ``ratio`` quantile of |sample| clamped to [1, ``max_value``]; the sample is clamped to [-s, s]
    and divided by s."""
    dtype = sample.dtype
    flat = sample.reshape(sample.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs float32/64 (and clamp has no CPU half)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


class VpSolverScheduler(SchedulerMixin, ConfigMixin):
    """Base of the accel-diffusion solvers for VP (ε / v / x0-predicting) diffusion models."""

    _compatibles: ClassVar[list[str]] = [e.name for e in KarrasDiffusionSchedulers]
    order = 1  # model calls per step (diffusers' meaning of ``scheduler.order``)

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """``from_config`` of another accel-diffusion solver's config: its solver-specific keys (a GHVB
        label 3.8 is no DEIS order, a DEIS variant no GHVB key, each solver has its own default grid)
        are dropped, as diffusers drops another diffusers scheduler's keys. Keyword arguments still apply."""
        source = _solver_of(config_dict)
        if source is not None and source != cls.__name__:
            config_dict = {k: v for k, v in config_dict.items() if k not in SOLVER_SPECIFIC_KEYS}
        return super().extract_init_dict(config_dict, **kwargs)

    def _init_noise_process(self) -> None:
        cfg = self.config
        _choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        _choice("timestep_spacing", cfg.timestep_spacing, DIFFUSERS_SPACINGS)
        _choice("sigma_spacing", cfg.sigma_spacing, (None, *SIGMA_SPACINGS))
        _choice("final_sigmas_type", cfg.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if cfg.karras_rho <= 0:
            raise ValueError(f"karras_rho: must be > 0, got {cfg.karras_rho}")
        if cfg.rescale_betas_zero_snr:
            raise ValueError("rescale_betas_zero_snr: zero terminal SNR (rho_max = inf) is not supported")
        _choice("variance_type", cfg.variance_type, VARIANCE_TYPES)
        flags = [name for name in GRID_FLAGS if cfg[name]]
        if len(flags) > 1:
            raise ValueError(f"{', '.join(flags)}: each selects a sigma grid; set only one of them")
        if not 0.0 < cfg.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio: must be in (0, 1], got {cfg.dynamic_thresholding_ratio}")
        if not cfg.sample_max_value > 0:
            raise ValueError(f"sample_max_value: must be > 0, got {cfg.sample_max_value}")
        self.betas = train_betas(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.vp_time = ContinuousVpTime(self.alphas_cumprod)
        lambda_top = -np.log(self.vp_time.rho_min)  # lambda = -log rho at t = 0, the largest
        if np.isnan(cfg.lambda_min_clipped) or cfg.lambda_min_clipped >= lambda_top:
            raise ValueError(f"lambda_min_clipped: {cfg.lambda_min_clipped} leaves no noise level (lambda = -log "
                             f"rho runs from {-np.log(self.vp_time.rho_max):.4g} to {lambda_top:.4g}); pass a "
                             f"value below {lambda_top:.4g}, or -inf for no clipping")
        self._rho_top = min(self.vp_time.rho_max, float(np.exp(-cfg.lambda_min_clipped)))
        self._last_timestep = unclipped_timesteps(self.alphas_cumprod, cfg.lambda_min_clipped)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.from_numpy(self.vp_time.rho_knots[1:][::-1].astype(np.float32))
        self._rho = np.zeros(0)
        self._alpha = np.zeros(0)
        self._sigma = np.zeros(0)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ---- diffusers' step bookkeeping ------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index of the next step (None until the first ``step`` call)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index (set by img2img pipelines through ``set_begin_index``)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = float(timestep)
        matches = (schedule.cpu().to(torch.float64) == value).nonzero()  # on the CPU: MPS has no float64
        if len(matches) == 0:
            raise ValueError(f"timestep {value:g} is not in this scheduler's timesteps")
        return int(matches[0])

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """VP models take x_t as is."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- the grid -------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Set the grid (a step count, or explicit ``timesteps`` or ``sigmas``) and reset all state."""
        if mu is not None:
            raise ValueError("mu: dynamic shifting is for flow-matching models; this is a VP solver")
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        cfg = self.config
        time = self.vp_time
        final: float | None = None
        if sigmas is not None:
            rho_all = _as_float64(sigmas)
            if rho_all.ndim != 1 or len(rho_all) < 2:
                raise ValueError("sigmas: need N + 1 >= 2 values (the model is called at the first N)")
            if not np.isfinite(rho_all).all() or rho_all[-1] < 0:
                raise ValueError("sigmas: must be finite and >= 0")
            _check_decreasing("sigmas", rho_all)
            if rho_all[-2] <= 0:
                raise ValueError("sigmas: only the last value may be 0")
            model_t = time.t(rho_all[:-1]).astype(np.float32)
            final = float(rho_all[-1])
        elif timesteps is not None:
            model_t = _as_float64(timesteps)
            if model_t.ndim != 1 or len(model_t) < 1:
                raise ValueError("timesteps: need at least one timestep")
            if not np.isfinite(model_t).all():
                raise ValueError("timesteps: must be finite")
            _check_decreasing("timesteps", model_t)
            if model_t[0] > time.t_max or model_t[-1] < 0:
                raise ValueError(f"timesteps: must lie in [0, {time.t_max:g}]")
            model_t = model_t.astype(np.int64) if np.all(model_t == np.round(model_t)) else model_t.astype(np.float32)
        else:
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps: must be >= 1, got {num_inference_steps}")
            spacing = next((GRID_FLAGS[name] for name in GRID_FLAGS if cfg[name]), cfg.sigma_spacing)
            if spacing is None:
                model_t = diffusers_timesteps(
                    num_inference_steps, cfg.num_train_timesteps, cfg.timestep_spacing, cfg.steps_offset,
                    self._last_timestep,
                )
            else:
                grid = sigma_grid(num_inference_steps, spacing, time, cfg.karras_rho, self._rho_top)
                model_t = time.t(grid[:-1]).astype(np.float32)
        # rho at the timesteps the model actually receives (after rounding to their dtype)
        rho_calls = time.rho(model_t.astype(np.float64))
        _check_decreasing("timesteps (after rounding)", rho_calls)
        if final is None:
            final = 0.0 if cfg.final_sigmas_type == "zero" else time.rho_min
        if num_inference_steps is not None:
            # many integer steps reach t = 0, where "sigma_min" ends: no step follows that call, so drop it
            keep = rho_calls > final
            if not keep.any():
                raise ValueError(f"num_inference_steps: {num_inference_steps} steps with timestep_spacing="
                                 f"{cfg.timestep_spacing!r} all fall on timestep {int(model_t[0])}, where "
                                 "final_sigmas_type='sigma_min' ends; use fewer steps or final_sigmas_type='zero'")
            model_t, rho_calls = model_t[keep], rho_calls[keep]
        if final >= rho_calls[-1]:
            raise ValueError("the final noise level must lie below the last model call's (a last timestep of 0 "
                             "needs final_sigmas_type='zero')")
        self._rho = np.concatenate([rho_calls, [final]])
        self._alpha, self._sigma = alpha_sigma_from_rho(self._rho)
        self.sigmas = torch.from_numpy(self._rho.astype(np.float32))
        self.timesteps = torch.from_numpy(model_t).to(device)
        self.num_inference_steps = len(model_t)
        self._step_index = None
        self._begin_index = None
        self._on_set_timesteps()

    def alpha_sigma_at(self, timestep: float | torch.Tensor) -> tuple[float, float]:
        """(alpha, sigma) the model is queried at for ``timestep`` (fractional timesteps included)."""
        alpha, sigma = alpha_sigma_from_rho(self.vp_time.rho(float(timestep)))
        return float(alpha), float(sigma)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x0 + sigma_t noise at each sample's (possibly fractional) timestep."""
        rho = self.vp_time.rho(timesteps.detach().cpu().to(torch.float64).reshape(-1).numpy())
        alpha, sigma = alpha_sigma_from_rho(rho)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = torch.from_numpy(alpha).to(original_samples.device, original_samples.dtype).reshape(shape)
        s = torch.from_numpy(sigma).to(original_samples.device, original_samples.dtype).reshape(shape)
        return a * original_samples + s * noise

    # ---- the step -------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Move ``sample`` from this step's noise level to the next one."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        n = self._step_index
        if n >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps are done; call set_timesteps again")
        work_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        x = sample.to(work_dtype)
        out = self._mean_output(model_output, sample).to(work_dtype)
        eps, x0 = self._predictions(n, out, x)
        prev = self._solver_step(n, x, eps, x0).to(sample.dtype)
        self._step_index = n + 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output without its variance channels (``variance_type`` "learned"/"learned_range")."""
        variance_type = self.config.variance_type
        if variance_type in LEARNED_VARIANCE_TYPES:
            channels = sample.shape[1] if sample.ndim > 1 else 0
            if sample.ndim < 2 or model_output.shape != (sample.shape[0], 2 * channels, *sample.shape[2:]):
                raise ValueError(f"model_output: shape {tuple(model_output.shape)}; with variance_type="
                                 f"{variance_type!r} the model outputs 2 x {channels} channels (mean, then "
                                 f"variance) for a sample of shape {tuple(sample.shape)}")
            return model_output[:, :channels]
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output: shape {tuple(model_output.shape)} differs from the sample's "
                             f"{tuple(sample.shape)} (a model that also outputs its variance needs "
                             "variance_type='learned_range' or 'learned')")
        return model_output

    def _predictions(self, n: int, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, x̂0) at step n from the model output in the model's parameterisation; with
        ``thresholding``, x̂0 is thresholded and ε̂ recomputed from it (as diffusers' DEIS does)."""
        alpha, sigma = float(self._alpha[n]), float(self._sigma[n])
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps, x0 = out, (x - sigma * out) / alpha
        elif kind == "v_prediction":
            eps, x0 = sigma * x + alpha * out, alpha * x - sigma * out
        else:  # "sample"
            eps, x0 = (x - alpha * out) / sigma, out
        if self.config.thresholding:
            x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            eps = (x - alpha * x0) / sigma
        return eps, x0

    def _euler_at(self, n: int) -> bool:
        """Whether ``euler_at_final`` makes step n (the last) a first-order (DDIM) step."""
        return bool(self.config.euler_at_final) and n == self.num_inference_steps - 1

    def _xbar_step(self, n: int, x: torch.Tensor, increment: torch.Tensor) -> torch.Tensor:
        """x_{n+1} = alpha_{n+1} (x_n / alpha_n + increment), the update in x̄ = x / alpha coordinates."""
        return float(self._alpha[n + 1] / self._alpha[n]) * x + float(self._alpha[n + 1]) * increment

    def _on_set_timesteps(self) -> None:
        """Precompute this solver's coefficients for the new grid and reset its state."""
        raise NotImplementedError

    def _solver_step(self, n: int, x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x at ``self._rho[n + 1]`` from x at ``self._rho[n]`` and this step's predictions."""
        raise NotImplementedError

    @property
    def rho(self) -> np.ndarray:
        """The N + 1 noise levels of the current grid, float64 (``sigmas`` is their float32 copy)."""
        return self._rho


def _as_float64(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def _check_decreasing(name: str, values: np.ndarray) -> None:
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"{name}: must be strictly decreasing")


# Adams-Bashforth weights for equal steps, newest first: AB1 .. AB4.
AB_WEIGHTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
