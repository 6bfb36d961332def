"""accel_diffusion.schedulers"""
