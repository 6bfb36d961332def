"""accel_diffusion.models.shapes"""
