"""accel_diffusion.models"""
