"""Packaging glue: the top-level ``server/`` folder is installed as ``accel_diffusion.server``.

The repository layout keeps the FastAPI app in ``server/`` (next to ``clients/`` and ``deploy/``),
but nothing is installed as a bare top-level ``server`` module. All other metadata is in
pyproject.toml.
"""

from setuptools import find_packages, setup

server_packages = ["accel_diffusion.server" + p[len("server"):] for p in find_packages(include=["server*"])]
setup(
    packages=find_packages(include=["accel_diffusion*"]) + server_packages,
    package_dir={"accel_diffusion.server": "server"},
)
