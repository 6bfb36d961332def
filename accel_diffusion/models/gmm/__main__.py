"""``python -m accel_diffusion.models.gmm``: regenerate the shipped pipeline directory."""

from accel_diffusion.models.gmm.pipeline import main

main()
