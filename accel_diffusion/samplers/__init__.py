"""accel_diffusion.samplers"""
