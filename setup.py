"""Packaging glue: the top-level ``server/`` and ``clients/`` folders are installed as
``accel_diffusion.server`` and ``accel_diffusion.clients``.

The repository layout keeps the FastAPI app in ``server/`` and the client SDK in ``clients/`` (next
to ``deploy/``), but nothing is installed as a bare top-level ``server`` or ``clients`` module. All
other metadata is in pyproject.toml.
"""

from setuptools import find_packages, setup

mapped = {"server": "accel_diffusion.server", "clients": "accel_diffusion.clients"}
mapped_packages = [target + p[len(folder):] for folder, target in mapped.items()
                   for p in find_packages(include=[folder, folder + ".*"])]
setup(
    packages=find_packages(include=["accel_diffusion*"]) + mapped_packages,
    package_dir={target: folder for folder, target in mapped.items()},
)
