"""accel_diffusion.guidance"""
