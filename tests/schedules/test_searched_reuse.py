"""A searched schedule's ``skip_mode``: "reuse" (DeepCache-style: a skipped block gives its cached output of the step
before) or "drop" (the default, and what artifacts written before the field load as); round trip, the engine
applying it, and the refusals (reuse at the first step, an unknown mode: a 400 naming the field)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from searched_fixtures import TINY_TIMESTEPS, request, tiny_artifact

from accel_diffusion.engine import Engine
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.searched import (
    BUILTIN_SCHEDULES_DIR,
    find_artifact,
    load_artifact,
    use_schedules_dir,
)


def test_skip_mode_round_trips_and_is_listed(schedules: Path) -> None:
    artifact = tiny_artifact("reuse", skipped_blocks=[[], ["mid_block.resnets.0"], [], []], skip_mode="reuse")
    path = artifact.save(schedules)
    assert json.loads(path.read_text())["skip_mode"] == "reuse"
    assert load_artifact(path) == artifact == find_artifact("reuse")
    assert find_artifact("reuse").summary()["skip_mode"] == "reuse"
    assert json.loads((schedules / "tiny-dpmpp-4.json").read_text())["skip_mode"] == "drop"  # the default, written


def test_artifacts_written_before_the_field_load_as_drop() -> None:
    path = BUILTIN_SCHEDULES_DIR / "shapes-ghvb0.8-cfg5-4-skip.json"
    assert "skip_mode" not in json.loads(path.read_text())  # shipped before reuse existed
    assert load_artifact(path).skip_mode == "drop"


@pytest.mark.parametrize(("change", "fragment"), [
    ({"skip_mode": "cache"}, "skip_mode: Input should be 'drop', 'reuse' or 'residual'"),
    ({"skip_mode": "reuse", "skipped_blocks": [["mid_block.resnets.0"], [], [], []]},
     "skipped_blocks: step 0 reuses 'mid_block.resnets.0', but with skip_mode 'reuse' the first step runs every block"),
])
def test_an_unknown_mode_or_reuse_at_the_first_step_is_refused(schedules: Path, change: dict, fragment: str) -> None:
    (schedules / "tiny-dpmpp-4.json").write_text(json.dumps(tiny_artifact().model_dump(mode="json") | change))
    with pytest.raises(InvalidRequestError) as error:
        get_registry().normalize("schedule", {"name": "searched", "id": "tiny-dpmpp-4"})
    assert error.value.field == "strategy.schedule.id"
    assert fragment in error.value.message, error.value.message


def test_the_engine_reuses_the_artifacts_blocks_like_the_hook(schedules: Path, tiny_registry: ModelRegistry) -> None:
    from accel_diffusion.engine.block_skip import BlockSkip, skippable_blocks

    engine = Engine(tiny_registry)
    unet = tiny_registry.get("tiny-sd").pipeline.unet
    blocks = skippable_blocks(unet)
    skipped = [[], [blocks[1], blocks[-2]], [blocks[1]], []]
    tiny_artifact("reuse", skipped_blocks=skipped, skip_mode="reuse").save(schedules)
    tiny_artifact("drop", skipped_blocks=skipped).save(schedules)
    explicit = request(strategy={"schedule": {"name": "timesteps", "timesteps": TINY_TIMESTEPS}})
    plain = engine.generate(explicit).images
    reused = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "reuse"}})).images
    dropped = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "drop"}})).images
    assert not np.array_equal(reused, plain) and not np.array_equal(reused, dropped)
    plan = dict(zip(TINY_TIMESTEPS, skipped, strict=True))
    with BlockSkip(unet, plan, mode="reuse") as by_hand:
        assert np.array_equal(engine.generate(explicit).images, reused)
    assert by_hand.skipped_calls == 3  # one batched call per step (cond and uncond together)
    again = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "reuse"}})).images
    assert np.array_equal(again, reused)  # a fresh cache per generation: nothing carried over


def test_server_lists_the_mode_and_refuses_an_unknown_one_with_a_400(tmp_path: Path, tiny_models_file: Path) -> None:
    from accel_diffusion.server import create_app
    from fastapi.testclient import TestClient
    from server_clients import make_settings

    tiny_artifact("tiny-reuse", model="tiny", skipped_blocks=[[], ["mid_block.resnets.0"], [], []],
                  skip_mode="reuse").save(tmp_path)
    bad = tiny_artifact("tiny-bad-mode", model="tiny").model_dump(mode="json") | {"skip_mode": "cache"}
    (tmp_path / "tiny-bad-mode.json").write_text(json.dumps(bad))
    body = {"prompt": "a red circle", "size": "32x32", "seed": 2, "response_format": "b64_json"}
    try:
        with TestClient(create_app(make_settings(tiny_models_file, schedules_dir=tmp_path))) as client:
            listed = {s["id"]: s for s in client.get("/v1/schedules").json()["data"]}
            assert listed["tiny-reuse"]["skip_mode"] == "reuse" and "tiny-bad-mode" not in listed
            for schedule_id, status in (("tiny-reuse", 200), ("tiny-bad-mode", 400)):
                strategy = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "searched", "id": schedule_id}}
                response = client.post("/v1/images/generations", json=body | {"strategy": strategy})
                assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["param"] == "strategy.schedule.id"
            assert "skip_mode: Input should be 'drop', 'reuse' or 'residual'" in error["message"], error["message"]
    finally:
        use_schedules_dir(None)
