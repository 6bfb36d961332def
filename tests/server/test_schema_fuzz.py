"""A bounded schemathesis run: requests generated from the OpenAPI schema never get a 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from accel_diffusion.server import create_app
from hypothesis import HealthCheck, settings
from server_clients import make_settings, running_server

FUZZ_LIMITS = {"max_steps": 2, "max_images": 2, "max_width": 64, "max_height": 64, "max_pixels": 64 * 64,
               "queue_max": 256}
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path("unused.toml"), **FUZZ_LIMITS)).openapi())


@pytest.fixture(scope="module")
def base_url(tiny_models_file: Path) -> Iterator[str]:
    app = create_app(make_settings(tiny_models_file, **FUZZ_LIMITS))
    with running_server(app) as (_, _, url):
        yield url


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    response = case.call(base_url=base_url, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
