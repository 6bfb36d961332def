"""The searched-schedule folder the tests of tests/schedules/ share."""

from __future__ import annotations

from pathlib import Path

import pytest
from searched_fixtures import tiny_artifact

from accel_diffusion.schedules.searched import SCHEDULES_DIR_ENV, use_schedules_dir


@pytest.fixture
def schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of searched schedules holding ``tiny_artifact()`` (``tiny-dpmpp-4``), configured through
    ``$ACCEL_DIFFUSION_SCHEDULES_DIR`` for the test."""
    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(tmp_path))
    use_schedules_dir(None)
    tiny_artifact().save(tmp_path)
    return tmp_path
