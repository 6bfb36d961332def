"""What the `timesteps` schedule means: the timesteps it visits, and runs equal to diffusers' where it has a twin.

The pins live in tests/component_pins.py (SCHEDULE_PINS), where tests/test_registry.py checks every registered
schedule has one.
"""

from __future__ import annotations

import pytest
from component_pins import check_schedule_pin, schedule_labels


@pytest.mark.parametrize("label", schedule_labels("timesteps"))
def test_explicit_timesteps_are_visited_and_run_like_diffusers(label: str) -> None:
    check_schedule_pin(label)
