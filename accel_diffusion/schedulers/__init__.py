"""accel_diffusion.schedulers: diffusers-compatible solvers (``pipe.scheduler = GhvbScheduler.from_config(
pipe.scheduler.config, order=3.8)``)."""

from accel_diffusion.schedulers.deis import DeisScheduler
from accel_diffusion.schedulers.ghvb import GhvbScheduler
from accel_diffusion.schedulers.heavy_ball import HeavyBallScheduler

__all__ = ["DeisScheduler", "GhvbScheduler", "HeavyBallScheduler"]
