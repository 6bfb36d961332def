"""accel_diffusion.eval"""
