"""What the `karras` schedule means: the timesteps it visits, and runs equal to diffusers' at rho 7.

The pins live in tests/component_pins.py (SCHEDULE_PINS), where tests/test_registry.py checks every registered
schedule has one.
"""

from __future__ import annotations

import pytest
from component_pins import check_schedule_pin, schedule_labels


@pytest.mark.parametrize("label", schedule_labels("karras"))
def test_karras_visits_the_pinned_timesteps_and_runs_like_diffusers(label: str) -> None:
    check_schedule_pin(label)
