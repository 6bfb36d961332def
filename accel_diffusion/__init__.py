"""accel-diffusion: faster diffusion generation behind one engine and one Strategy interface."""

__version__ = "0.1.0"
