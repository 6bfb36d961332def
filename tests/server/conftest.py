"""A server on the tiny random SD model (model id "tiny", 32x32, 4 default steps), one per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings


@pytest.fixture(scope="module")
def client(tiny_models_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tiny_models_file))) as test_client:
        yield test_client
