"""accel_diffusion.engine"""
