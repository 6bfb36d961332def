"""accel-diffusion's model server (installed as ``accel_diffusion.server``): ``create_app(settings)``."""

from accel_diffusion.server.app import create_app
from accel_diffusion.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
