"""The denoising engine: one loop, components plugged in by a Strategy."""

from accel_diffusion.engine.engine import Engine, GenerationResult, generate
from accel_diffusion.engine.hooks import GenerationHooks, StepEvent
from accel_diffusion.engine.loop import denoise

__all__ = ["Engine", "GenerationHooks", "GenerationResult", "StepEvent", "denoise", "generate"]
