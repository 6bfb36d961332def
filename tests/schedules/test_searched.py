"""The `searched` schedule: artifacts (round trip, validation), lookup by id, the refusals for another model,
sampler, guidance or step count, its runs through the engine and the server, and the real gmm search it pins."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from component_pins import check_schedule_pin
from searched_fixtures import (
    GMM_SEARCHED_ID,
    GMM_SEARCHED_TIMESTEPS,
    TINY_TIMESTEPS,
    gmm_search,
    gmm_searched_dir,
    request,
    tiny_artifact,
)

from accel_diffusion.engine import Engine
from accel_diffusion.engine.engine import check_request
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.searched import (
    BUILTIN_SCHEDULES_DIR,
    SCHEDULES_DIR_ENV,
    SearchedArtifact,
    find_artifact,
    list_artifacts,
    load_artifact,
    use_schedules_dir,
)
from accel_diffusion.strategy import GenerationRequest

SHIPPED = {path.stem for path in BUILTIN_SCHEDULES_DIR.glob("*.json")}  # the searched schedules shipped for shapes


def test_the_gmm_search_finds_the_pinned_schedule_far_closer_to_the_teacher_than_uniform() -> None:
    artifact, uniform_distance = gmm_search()
    assert artifact.timesteps == GMM_SEARCHED_TIMESTEPS
    # measured: 0.0902 searched vs 0.3156 uniform (999, 749, 499, 249), 72 candidates
    assert artifact.fitness.value == pytest.approx(0.0902, abs=5e-4)
    assert uniform_distance == pytest.approx(0.3156, abs=5e-4)
    assert artifact.fitness.value < 0.3 * uniform_distance


def test_searched_schedule_visits_its_timesteps_and_runs_like_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(gmm_searched_dir()))
    check_schedule_pin("searched")


def test_artifact_round_trips_through_its_file(schedules: Path) -> None:
    artifact = tiny_artifact()
    path = schedules / "tiny-dpmpp-4.json"
    data = json.loads(path.read_text())
    assert data["format"] == "accel-diffusion/searched-schedule@1"
    assert data["sampler"] == {"name": "dpmpp_2m", **get_registry().normalize("sampler", "dpmpp_2m")}
    assert data["guidance"] == {"name": "cfg", **get_registry().normalize("guidance", {"name": "cfg", "scale": 5.0})}
    assert {k: data[k] for k in ("model", "steps", "timesteps", "skipped_blocks", "seed")} == {
        "model": "tiny-sd", "steps": 4, "timesteps": TINY_TIMESTEPS, "skipped_blocks": [[], [], [], []], "seed": 3}
    assert data["fitness"] == {"kind": "paired_distance", "value": 0.25, "samples": 8}
    assert data["search"] == {"evaluations": 30, "wall_time_s": 12.5, "command": "accel-diffusion search ...",
                              "skip_budget": None, "unet_cost": None, "seed_timesteps": []}
    assert load_artifact(path) == artifact == find_artifact("tiny-dpmpp-4")
    assert SearchedArtifact.model_validate_json(json.dumps(artifact.model_dump(mode="json"))) == artifact
    schedule = get_registry().build("schedule", {"name": "searched", "id": "tiny-dpmpp-4"})
    assert schedule.num_steps(25) == 4 and schedule.artifact == artifact


@pytest.mark.parametrize(("change", "fragment"), [
    ({"format": "other@2"}, "format: is 'other@2'; this version reads 'accel-diffusion/searched-schedule@1'"),
    ({"timesteps": [999, 700, 400]}, "timesteps: 3 given for steps = 4"),
    ({"timesteps": [999, 400, 700, 100]}, "must be strictly decreasing"),
    ({"skipped_blocks": [[], []]}, "skipped_blocks: 2 lists given for steps = 4"),
    ({"sampler": {"name": "dpmpp_9m"}}, "unknown sampler 'dpmpp_9m'"),
    ({"id": "other-id"}, "has id 'other-id'; its file must be other-id.json"),
])
def test_an_invalid_artifact_is_refused_naming_file_and_field(schedules: Path, change: dict, fragment: str) -> None:
    data = tiny_artifact().model_dump(mode="json") | change
    (schedules / "tiny-dpmpp-4.json").write_text(json.dumps(data))
    with pytest.raises(InvalidRequestError) as error:
        get_registry().normalize("schedule", {"name": "searched", "id": "tiny-dpmpp-4"})
    assert error.value.field == "strategy.schedule.id"
    assert f"searched schedule '{schedules / 'tiny-dpmpp-4.json'}'" in error.value.message
    assert fragment in error.value.message, error.value.message


def test_unknown_and_malformed_ids_are_refused(schedules: Path) -> None:
    with pytest.raises(InvalidRequestError) as error:
        get_registry().normalize("schedule", {"name": "searched", "id": "nope"})
    assert (error.value.field, error.value.message) == ("strategy.schedule.id", "no searched schedule 'nope'")
    assert error.value.allowed == ", ".join(repr(i) for i in sorted({"tiny-dpmpp-4", *SHIPPED}))
    for bad in ("../tiny-dpmpp-4", "a/b", ""):
        with pytest.raises(InvalidRequestError) as error:
            get_registry().normalize("schedule", {"name": "searched", "id": bad})
        assert error.value.field == "strategy.schedule.id" and "should match pattern" in error.value.message
    with pytest.raises(InvalidRequestError) as error:
        get_registry().normalize("schedule", {"name": "searched"})
    assert error.value.field == "strategy.schedule.id"


def test_listing_prefers_the_configured_folder_and_skips_invalid_files(schedules: Path, tmp_path_factory,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    other = tmp_path_factory.mktemp("other")
    tiny_artifact(seed=7).save(other)
    tiny_artifact("second", steps=2, timesteps=[999, 500], skipped_blocks=[]).save(other)
    (other / "broken.json").write_text("{")
    use_schedules_dir(other)  # over the environment's folder
    try:
        with caplog.at_level(logging.WARNING):
            listed = [a for a in list_artifacts() if a.id not in SHIPPED]
        assert [(a.id, a.seed) for a in listed] == [("second", 3), ("tiny-dpmpp-4", 7)]
        assert "broken.json" in caplog.text
    finally:
        use_schedules_dir(None)
    assert [a.id for a in list_artifacts()] == sorted(["tiny-dpmpp-4", *SHIPPED])


def test_engine_runs_the_searched_timesteps(schedules: Path, tiny_registry: ModelRegistry) -> None:
    engine = Engine(tiny_registry)
    searched = engine.generate(request())
    explicit = engine.generate(request(strategy={"schedule": {"name": "timesteps", "timesteps": TINY_TIMESTEPS}}))
    assert searched.steps == 4 and searched.nfe == 8
    assert np.array_equal(searched.images, explicit.images)
    assert searched.strategy.schedule == {"name": "searched", "id": "tiny-dpmpp-4"}
    assert np.array_equal(engine.generate(request(steps=4)).images, searched.images)


def test_the_artifacts_skipped_blocks_are_skipped_at_their_steps(schedules: Path, tiny_registry: ModelRegistry) -> None:
    from accel_diffusion.engine.block_skip import BlockSkip, skippable_blocks

    engine = Engine(tiny_registry)
    unet = tiny_registry.get("tiny-sd").pipeline.unet
    blocks = skippable_blocks(unet)
    skipped = [[], [blocks[0], blocks[-1]], [], [blocks[1]]]
    tiny_artifact("skips", skipped_blocks=skipped).save(schedules)
    tiny_artifact("skips-none", skipped_blocks=[[], [], [], []]).save(schedules)
    explicit = request(strategy={"schedule": {"name": "timesteps", "timesteps": TINY_TIMESTEPS}})
    plain = engine.generate(explicit).images
    assert np.array_equal(engine.generate(request(strategy={"schedule": {"name": "searched", "id": "skips-none"}}))
                          .images, plain)
    searched = engine.generate(request(strategy={"schedule": {"name": "searched", "id": "skips"}})).images
    assert not np.array_equal(searched, plain)
    with BlockSkip(unet, {999: [], 700: [blocks[0], blocks[-1]], 100: [blocks[1]]}) as by_hand:
        assert np.array_equal(engine.generate(explicit).images, searched)
    assert by_hand.skipped_calls == 3  # one batched call per step (cond and uncond together)
    tiny_artifact("bad-skips", skipped_blocks=[[], ["up_blocks.9.resnets.0"], [], []]).save(schedules)
    bad = request(strategy={"schedule": {"name": "searched", "id": "bad-skips"}})
    for refuse in (lambda: check_request(tiny_registry.spec("tiny-sd"), bad),  # at submit: read from the config
                   lambda: engine.generate(bad)):
        with pytest.raises(IncompatibleStrategyError) as error:
            refuse()
        assert error.value.field == "strategy.schedule.id"
        assert ("searched schedule 'bad-skips' skips 'up_blocks.9.resnets.0' at step 1 (skipped_blocks), which the "
                f"UNet of model 'tiny-sd' does not have (its blocks: {', '.join(blocks)})") in error.value.message


@pytest.mark.parametrize(("fields", "field", "fragment"), [
    ({"model": "tiny-sdxl"}, "model", "made for model 'tiny-sd', not 'tiny-sdxl'"),
    ({"strategy": {"sampler": {"name": "ghvb"}}}, "strategy.sampler.name", 'made for sampler {"name": "dpmpp_2m"'),
    ({"strategy": {"sampler": {"name": "dpmpp_2m", "order": 3}}}, "strategy.sampler", '"order": 3'),
    ({"strategy": {"guidance": {"name": "cfg", "scale": 7.0}}}, "strategy.guidance",
     'made for guidance {"name": "cfg", "scale": 5.0, '),
    ({"steps": 6}, "steps", "made for 4 steps, not 6: send steps = 4 or leave steps out"),
])
def test_another_model_sampler_guidance_or_step_count_is_refused(schedules: Path, tiny_registry: ModelRegistry,
                                                                 fields: dict, field: str, fragment: str) -> None:
    bad = request(**fields)
    for refuse in (lambda: check_request(tiny_registry.spec(bad.model), bad),
                   lambda: Engine(tiny_registry).generate(bad)):
        with pytest.raises(IncompatibleStrategyError) as error:
            refuse()
        assert error.value.field == field and fragment in error.value.message, error.value.message


def test_server_lists_searched_schedules_and_refuses_a_mismatch(tmp_path: Path, tiny_models_file: Path) -> None:
    from accel_diffusion.server import create_app
    from fastapi.testclient import TestClient
    from server_clients import make_settings

    tiny_artifact(model="tiny").save(tmp_path)
    searched = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "searched", "id": "tiny-dpmpp-4"}}
    try:
        with TestClient(create_app(make_settings(tiny_models_file, schedules_dir=tmp_path))) as client:
            listed = client.get("/v1/schedules").json()
            assert listed["object"] == "list"
            assert [(s["id"], s["model"], s["steps"], s["timesteps"]) for s in listed["data"]
                    if s["id"] not in SHIPPED] == [("tiny-dpmpp-4", "tiny", 4, TINY_TIMESTEPS)]
            tiny = next(s for s in listed["data"] if s["id"] == "tiny-dpmpp-4")
            assert tiny["fitness"] == {"kind": "paired_distance", "value": 0.25, "samples": 8}
            body = {"prompt": "a red circle", "size": "32x32", "seed": 2, "response_format": "b64_json"}
            ok = client.post("/v1/images/generations", json=body | {"strategy": searched})
            assert ok.status_code == 200, ok.text
            for change, param in (({"steps": 6}, "steps"), ({"strategy": {**searched, "sampler": "ghvb"}},
                                                            "strategy.sampler.name")):
                response = client.post("/v1/images/generations", json=body | {"strategy": searched} | change)
                assert response.status_code == 400, response.text
                assert response.json()["error"]["param"] == param
            job = client.post("/v1/jobs", json={"prompt": "a", "strategy": {**searched, "guidance": "none"}})
            assert job.status_code == 400 and job.json()["error"]["param"] == "strategy.guidance.name"
            bad_skips = [["mid_block.resnets.7"], [], [], []]
            tiny_artifact("tiny-skips", model="tiny", skipped_blocks=bad_skips).save(tmp_path)
            job = client.post("/v1/jobs", json={"prompt": "a", "strategy": {**searched, "schedule": {
                "name": "searched", "id": "tiny-skips"}}})
            assert job.status_code == 400 and job.json()["error"]["param"] == "strategy.schedule.id"
            assert "skips 'mid_block.resnets.7' at step 0 (skipped_blocks)" in job.json()["error"]["message"]
    finally:
        use_schedules_dir(None)


def test_the_pinned_id_is_the_gmm_artifact() -> None:
    assert GMM_SEARCHED_ID == "gmm-dpmpp_2m-4"
    assert load_artifact(gmm_searched_dir() / f"{GMM_SEARCHED_ID}.json").timesteps == GMM_SEARCHED_TIMESTEPS


SHIPPED_FOR_SHAPES = {"shapes-ghvb0.8-cfg5-4", "shapes-dpmpp_2m-cfg5-4", "shapes-ghvb0.8-cfg5-6",
                      "shapes-dpmpp_2m-cfg5-6", "shapes-ghvb0.8-cfg5-4-skip", "shapes-ghvb0.8-cfg5-8-skip"}


def test_the_shipped_shapes_schedules_are_found_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SCHEDULES_DIR_ENV, raising=False)
    use_schedules_dir(None)
    found = {a.id: a for a in list_artifacts()}
    assert SHIPPED_FOR_SHAPES <= set(found) == SHIPPED
    shapes = ModelRegistry.default().spec("shapes")
    for schedule_id in sorted(SHIPPED):
        artifact = found[schedule_id]
        assert artifact.model == "shapes" and artifact.guidance["scale"] == 5.0
        assert artifact.fitness.kind == "prompt_accuracy"
        assert artifact.search.command.startswith("accel-diffusion search")
        assert 0 < artifact.search.evaluations and artifact.search.wall_time_s <= 20 * 60  # the target
        searched = {"name": "searched", "id": schedule_id}
        request = GenerationRequest.create(model="shapes", prompt="a red circle on a blue background", strategy={
            "sampler": artifact.sampler, "guidance": artifact.guidance, "schedule": searched})
        check_request(shapes, request)  # its skipped blocks (if any) are the shapes UNet's
