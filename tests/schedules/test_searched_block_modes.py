"""A searched schedule's per-block modes (``block_modes``: each skipped block dropped, reused or residual on its own,
over ``skip_mode`` for the rest): round trip and listing, artifacts without the field loading as before, the engine
applying them like the hook, and the refusals (an unknown mode, a block not skipped, a cached block at the first step:
a 400 naming the field)."""

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
    SCHEDULES_DIR_ENV,
    find_artifact,
    load_artifact,
    use_schedules_dir,
)
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")

MIXED = {"skipped_blocks": [[], ["mid_block.resnets.0", "mid_block.attentions.0"], ["mid_block.resnets.0"], []],
         "block_modes": {"mid_block.resnets.0": "residual", "mid_block.attentions.0": "drop"}}


def test_block_modes_round_trip_and_are_listed(schedules: Path) -> None:
    artifact = tiny_artifact("mixed", **MIXED)
    path = artifact.save(schedules)
    assert json.loads(path.read_text())["block_modes"] == MIXED["block_modes"]
    assert load_artifact(path) == artifact == find_artifact("mixed")
    assert find_artifact("mixed").summary()["block_modes"] == MIXED["block_modes"]
    assert artifact.modes() == MIXED["block_modes"]
    partial = tiny_artifact("partial", skipped_blocks=MIXED["skipped_blocks"], skip_mode="reuse",
                            block_modes={"mid_block.attentions.0": "drop"})
    assert partial.modes() == {"mid_block.resnets.0": "reuse", "mid_block.attentions.0": "drop"}  # skip_mode: the rest


@pytest.mark.parametrize("shipped", sorted(p.stem for p in BUILTIN_SCHEDULES_DIR.glob("*.json")))
def test_artifacts_without_block_modes_mean_one_mode_for_every_block(shipped: str) -> None:
    path = BUILTIN_SCHEDULES_DIR / f"{shipped}.json"
    artifact = load_artifact(path)
    if "block_modes" not in json.loads(path.read_text()):
        assert artifact.block_modes == {} and artifact.modes() == artifact.skip_mode


@pytest.mark.parametrize(("change", "fragment"), [
    ({"block_modes": {"mid_block.resnets.0": "cache"}},
     "block_modes.mid_block.resnets.0: Input should be 'drop', 'reuse' or 'residual'"),
    ({"block_modes": {"mid_block.resnets.1": "drop"}},
     "block_modes: 'mid_block.resnets.1' is not skipped at any step (skipped_blocks); leave it out"),
    ({"skipped_blocks": [["mid_block.resnets.0"], [], [], []], "block_modes": {"mid_block.resnets.0": "residual"}},
     "skipped_blocks: step 0 reuses 'mid_block.resnets.0', but with block_modes 'residual' the first step runs"),
])
def test_an_unknown_or_idle_mode_or_caching_at_the_first_step_is_refused(schedules: Path, change: dict,
                                                                          fragment: str) -> None:
    (schedules / "tiny-dpmpp-4.json").write_text(json.dumps(tiny_artifact().model_dump(mode="json") | change))
    with pytest.raises(InvalidRequestError) as error:
        get_registry().normalize("schedule", {"name": "searched", "id": "tiny-dpmpp-4"})
    assert error.value.field == "strategy.schedule.id"
    assert fragment in error.value.message, error.value.message


def test_a_dropped_block_may_be_skipped_at_the_first_step_beside_cached_ones(schedules: Path) -> None:
    artifact = tiny_artifact("drop-first", skipped_blocks=[["mid_block.attentions.0"], ["mid_block.resnets.0"], [], []],
                             skip_mode="residual", block_modes={"mid_block.attentions.0": "drop"})
    assert artifact.modes() == {"mid_block.attentions.0": "drop", "mid_block.resnets.0": "residual"}


def test_the_engine_skips_each_block_in_its_mode_like_the_hook(schedules: Path, tiny_registry: ModelRegistry) -> None:
    from accel_diffusion.engine.block_skip import BlockSkip, skippable_blocks

    engine = Engine(tiny_registry)
    unet = tiny_registry.get("tiny-sd").pipeline.unet
    blocks = skippable_blocks(unet)
    resnet = next(b for b in blocks if "resnets" in b)
    attention = next(b for b in blocks if "attentions" in b)
    skipped = [[], [resnet, attention], [resnet], []]
    modes = {resnet: "residual", attention: "drop"}
    tiny_artifact("mixed", skipped_blocks=skipped, block_modes=modes).save(schedules)
    tiny_artifact("residual", skipped_blocks=skipped, skip_mode="residual").save(schedules)
    explicit = request(strategy={"schedule": {"name": "timesteps", "timesteps": TINY_TIMESTEPS}})
    mixed = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "mixed"}})).images
    residual = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "residual"}})).images
    assert not np.array_equal(mixed, residual)
    with BlockSkip(unet, dict(zip(TINY_TIMESTEPS, skipped, strict=True)), mode=modes) as by_hand:  # type: ignore[arg-type]
        assert np.array_equal(engine.generate(explicit).images, mixed)
    assert by_hand.skipped_calls == 3


def test_server_refuses_an_unknown_block_mode_with_a_400_naming_the_field(tmp_path: Path,
                                                                           tiny_models_file: Path) -> None:
    from accel_diffusion.server import create_app
    from fastapi.testclient import TestClient
    from server_clients import make_settings

    bad = tiny_artifact("tiny-bad-block-mode", model="tiny", **MIXED).model_dump(mode="json")
    bad["block_modes"]["mid_block.resnets.0"] = "cache"
    (tmp_path / "tiny-bad-block-mode.json").write_text(json.dumps(bad))
    tiny_artifact("tiny-mixed", model="tiny", **MIXED).save(tmp_path)
    body = {"prompt": "a red circle", "size": "32x32", "seed": 2, "response_format": "b64_json"}
    try:
        with TestClient(create_app(make_settings(tiny_models_file, schedules_dir=tmp_path))) as client:
            listed = {s["id"]: s for s in client.get("/v1/schedules").json()["data"]}
            assert listed["tiny-mixed"]["block_modes"] == MIXED["block_modes"] and "tiny-bad-block-mode" not in listed
            for schedule_id, status in (("tiny-mixed", 200), ("tiny-bad-block-mode", 400)):
                strategy = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "searched", "id": schedule_id}}
                response = client.post("/v1/images/generations", json=body | {"strategy": strategy})
                assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["param"] == "strategy.schedule.id"
            assert "block_modes.mid_block.resnets.0: Input should be 'drop', 'reuse' or 'residual'" in error["message"]
    finally:
        use_schedules_dir(None)


def test_the_shipped_8_step_plan_skips_each_block_in_its_probe_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_diffusion.engine.block_skip import BlockSkip

    monkeypatch.delenv(SCHEDULES_DIR_ENV, raising=False)
    use_schedules_dir(None)
    artifact = find_artifact("shapes-ghvb0.8-cfg5-8-skip")
    assert artifact.steps == 8 and artifact.timesteps == [999, 939, 865, 768, 636, 448, 211, 37]  # Karras rho 3
    assert (artifact.sampler["name"], artifact.sampler["order"]) == ("ghvb", 0.8) and artifact.skipped_blocks[0] == []
    assert artifact.block_modes == artifact.modes() and set(artifact.block_modes.values()) == {"drop", "residual"}
    assert artifact.search.unet_cost <= artifact.search.skip_budget == 0.82
    engine = Engine(ModelRegistry.default())
    unet = engine.models.get("shapes").pipeline.unet
    prompts = ["a red circle on a blue background", "a green square on a white background"]

    def generate(schedule: dict) -> np.ndarray:
        strategy = {"sampler": artifact.sampler, "guidance": artifact.guidance, "schedule": schedule}
        return engine.generate(GenerationRequest.create(model="shapes", prompt=prompts, seed=1,
                                                        strategy=strategy)).to_uint8()

    searched = generate({"name": "searched", "id": artifact.id})
    explicit = {"name": "timesteps", "timesteps": artifact.timesteps}
    plan = dict(zip(artifact.timesteps, artifact.skipped_blocks, strict=True))
    with BlockSkip(unet, plan, mode=artifact.modes()):  # type: ignore[arg-type]
        assert np.array_equal(generate(explicit), searched)
    with BlockSkip(unet, plan, mode="drop"):  # one mode for every block gives other images
        assert not np.array_equal(generate(explicit), searched)
