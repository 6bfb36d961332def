"""accel_diffusion.schedules"""
