"""``GmmPipeline``: unconditional sampling of the mixture through the engine's loop; the shipped dir."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput

from accel_diffusion.models.gmm.denoiser import GmmDenoiser, ddim_scheduler_for
from accel_diffusion.models.gmm.mixture import default_mixture

BUILTIN_GMM_DIR = Path(__file__).resolve().parent.parent / "builtin" / "gmm"
"""Where the shipped ``gmm`` pipeline lives (written by :func:`main`)."""


@dataclass
class GmmPipelineOutput(BaseOutput):
    """Samples of :class:`GmmPipeline`: (B, 2) float64 numpy array or tensor."""

    samples: np.ndarray | torch.Tensor


class GmmPipeline(DiffusionPipeline):
    """Unconditional sampling from :class:`GmmDenoiser` with any diffusers scheduler.

    The ``denoiser`` may also be a one-step student of the mixture (``accel_diffusion.students``), saved
    with a one-step scheduler: then one step returns the student's samples.
    """

    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser: GmmDenoiser, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)

    @property
    def dim(self) -> int:
        """Dimension of the samples: the mixture's, or a one-step student's ``config.dim``."""
        mixture = getattr(self.denoiser, "mixture", None)
        return int(mixture.dim) if mixture is not None else int(self.denoiser.config.dim)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> GmmPipelineOutput | tuple[np.ndarray | torch.Tensor]:
        """Run the scheduler from x_T ~ N(0, I) (or ``latents``) to samples, in float64."""
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type: unsupported {output_type!r} (allowed: 'np', 'pt')")
        self.scheduler.set_timesteps(num_inference_steps)
        if latents is None:
            latents = torch.randn(batch_size, self.dim, generator=generator, dtype=torch.float64)
        x = latents.to(torch.float64) * self.scheduler.init_noise_sigma
        step_params = inspect.signature(self.scheduler.step).parameters
        extra: dict[str, Any] = {}
        if "eta" in step_params:
            extra["eta"] = eta
        if "generator" in step_params:
            extra["generator"] = generator
        # The engine's one denoising loop, with no guidance and no conditioning.
        from accel_diffusion.engine.conditioning import Conditioning
        from accel_diffusion.engine.loop import denoise
        from accel_diffusion.guidance.none import NoGuidance

        guidance = NoGuidance()
        guidance.begin(None)
        x = denoise(self.denoiser, x, self.scheduler, self.scheduler.timesteps, guidance,
                    Conditioning({"cond": {}}), step_kwargs=extra)
        samples: np.ndarray | torch.Tensor = x.cpu().numpy() if output_type == "np" else x
        if not return_dict:
            return (samples,)
        return GmmPipelineOutput(samples=samples)


def build_default_gmm_pipeline(prediction_type: str = "epsilon") -> GmmPipeline:
    """The shipped ``gmm`` pipeline: :func:`default_mixture` on SD's scaled-linear schedule + DDIM."""
    denoiser = GmmDenoiser.from_mixture(
        default_mixture(),
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )
    return GmmPipeline(denoiser=denoiser, scheduler=ddim_scheduler_for(denoiser))


def load_gmm_pipeline(path: str | Path = BUILTIN_GMM_DIR) -> GmmPipeline:
    """Load a saved ``gmm`` pipeline directory offline (defaults to the shipped one)."""
    return GmmPipeline.from_pretrained(str(path), local_files_only=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the shipped pipeline directory (``python -m accel_diffusion.models.gmm``)."""
    parser = argparse.ArgumentParser(description="Write the built-in gmm pipeline (safetensors).")
    parser.add_argument("--out", type=Path, default=BUILTIN_GMM_DIR, help="output directory")
    args = parser.parse_args(argv)
    pipe = build_default_gmm_pipeline()
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    print(f"wrote {args.out}")
