"""`accel-diffusion search` on the shipped `shapes` model (tiny settings), its fitness functions and its
hand-made generation-0 grids; the artifact it writes is then used by `generate` and refused for another sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.eval.schedule_fitness import (
    HELD_OUT_SEED,
    ShapesScheduleFitness,
    fitness_prompts,
    held_out_prompts,
    search_prompts,
)
from accel_diffusion.eval.shapes_eval import shapes_prompts
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.registry import get_registry
from accel_diffusion.schedules.autodiffusion import SearchSpace
from accel_diffusion.schedules.search_command import hand_made_grids, resolve_components
from accel_diffusion.schedules.searched import SCHEDULES_DIR_ENV, load_artifact

pytestmark = pytest.mark.usefixtures("single_thread")

CFG5 = {"name": "cfg", "scale": 5.0}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ModelRegistry.default())


def test_generation_zero_holds_the_hand_made_grids_the_sampler_builds(engine: Engine) -> None:
    shapes = engine.models.get("shapes")
    space = SearchSpace(4, 1000)
    config = dict(shapes.scheduler_config)
    dpmpp, _ = resolve_components(shapes.spec, "dpmpp_2m", None)
    # the model's spacing, trailing, leading, Karras rho 7 (diffusers' samplers build no other grid)
    assert hand_made_grids(config, dpmpp, space) == [(999, 749, 500, 250), (999, 749, 499, 249),
                                                      (801, 601, 401, 201), (999, 687, 146, 0)]
    ghvb, _ = resolve_components(shapes.spec, {"name": "ghvb", "order": 0.8}, None)
    grids = hand_made_grids(config, ghvb, space)
    assert len(grids) == 7 and (999, 562, 250, 62) in grids  # quadratic_t, log_snr, any Karras rho: ours only
    assert all(space.check(grid) == grid for grid in grids)


def test_search_and_held_out_prompts_split_the_196_in_two_fixed_halves() -> None:
    search, held_out = search_prompts(), held_out_prompts()
    assert len(search) == len(held_out) == 98 and not set(search) & set(held_out)
    assert sorted(search + held_out) == sorted(shapes_prompts())
    # fixed for good: the benchmark's held-out set never changes with the code around it
    assert search[:2] == ['a red circle on a green background', 'a red circle on a blue background']
    assert held_out[:2] == ['a green circle on a red background', 'a green circle on a blue background']
    for seed in range(20):  # whatever a search draws is a search prompt
        assert set(fitness_prompts(98, seed)) == set(search)
    with pytest.raises(ValueError, match="between 1 and 98"):
        fitness_prompts(99, 0)
    assert HELD_OUT_SEED > 900_000 + 98  # the search's largest seed (--seed <= 900000) + its images stay below


def test_fitness_is_zero_for_the_teachers_own_timesteps_and_measures_with_the_eval_code(engine: Engine) -> None:
    sampler, guidance = resolve_components(engine.models.get("shapes").spec, "dpmpp_2m", CFG5)
    fitness = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=4, teacher_steps=8, seed=2,
                                    kind="paired_distance")
    assert fitness.prompts == fitness_prompts(4, 2) and len(set(fitness.prompts)) == 4
    config = dict(engine.models.get("shapes").scheduler_config)
    teacher = get_registry().build("sampler", sampler).make_scheduler(config, {})
    teacher.set_timesteps(8)  # the model's own 8-step spacing: the teacher's run, as a candidate
    assert fitness([int(t) for t in teacher.timesteps]) == 0.0
    scores = fitness.scores([999, 749, 499, 249])
    assert scores["paired_distance"] == fitness([999, 749, 499, 249]) > 0.02
    assert scores["teacher_fd"] > 0 and 0 <= scores["prompt_accuracy"] <= 1 and 0 <= scores["out_of_gamut"] <= 1
    assert fitness.value(scores) == scores["paired_distance"]
    fitness.kind = "prompt_accuracy"
    assert fitness.value(scores) == 1.0 - scores["prompt_accuracy"]
    held_out = fitness_prompts(10, 7, exclude=fitness.prompts)
    assert not set(held_out) & set(fitness.prompts)


def test_search_cli_writes_an_artifact_that_generate_uses_and_other_samplers_are_refused(
        tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "schedules"
    args = ["search", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "5", "--out", "shapes-dpmpp-3",
            "--dir", str(folder), "--images", "3", "--rescore-images", "5", "--teacher-steps", "6",
            "--population", "4", "--select", "2", "--mutations", "1", "--crossovers", "1", "--epochs", "1"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    artifact = load_artifact(folder / "shapes-dpmpp-3.json")
    assert not (folder / "shapes-dpmpp-3.search-state").exists()
    assert (artifact.model, artifact.steps, artifact.seed) == ("shapes", 3, 0)
    assert artifact.sampler["name"] == "dpmpp_2m" and artifact.guidance == {**CFG5, "rescale": 0.0, "start": 0.0,
                                                                              "stop": 1.0}
    assert artifact.fitness.kind == "prompt_accuracy" and artifact.fitness.samples == 5  # the default fitness
    assert 4 <= artifact.search.evaluations <= 8 and artifact.search.wall_time_s > 0
    # the recorded fitness is reproducible: the same 5 prompts and seeds, scored again
    sampler, guidance = resolve_components(engine.models.get("shapes").spec, "dpmpp_2m", CFG5)
    again = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=5, teacher_steps=6)
    assert again.kind == "prompt_accuracy"
    assert again(artifact.timesteps) == pytest.approx(artifact.fitness.value, abs=1e-12)

    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(folder))
    out = tmp_path / "out"
    searched = json.dumps({"name": "searched", "id": "shapes-dpmpp-3"})
    ok = CliRunner().invoke(main, ["generate", "-p", "a red circle on a blue background", "--seed", "1", "--sampler",
                                   "dpmpp_2m", "--schedule", searched, "--guidance-scale", "5", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((out / "results.json").read_text())["runs"][0]
    assert summary["steps"] == 3 and summary["nfe"] == 6
    assert summary["strategy"]["schedule"] == {"name": "searched", "id": "shapes-dpmpp-3"}
    refused = CliRunner().invoke(main, ["generate", "-p", "a red circle", "--sampler", "euler", "--schedule", searched,
                                        "--guidance-scale", "5", "--out", str(out)])
    assert refused.exit_code == 2
    assert "strategy.sampler.name: searched schedule 'shapes-dpmpp-3' was made for sampler" in refused.output


def test_search_cli_stage_two_skips_blocks_within_the_budget_and_generate_applies_them(
        tmp_path: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_diffusion.engine.block_skip import skippable_blocks
    from accel_diffusion.eval.schedule_fitness import SkipPlanFitness

    folder = tmp_path / "schedules"
    args = ["search", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "5", "--out", "shapes-skip-3",
            "--dir", str(folder), "--images", "3", "--rescore-images", "3", "--teacher-steps", "6",
            "--population", "4", "--select", "2", "--mutations", "1", "--crossovers", "1", "--epochs", "1",
            "--skip-budget", "0.8", "--max-skip", "6", "--skip-epochs", "1", "--fitness", "paired_distance"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    artifact = load_artifact(folder / "shapes-skip-3.json")
    assert not list(folder.glob("*state"))
    assert artifact.search.skip_budget == 0.8 and 0 < artifact.search.unet_cost <= 0.8
    assert 8 <= artifact.search.evaluations <= 16  # both stages: 4 + 4 candidates a generation, 2 generations each
    blocks = skippable_blocks(engine.models.get("shapes").pipeline.unet)
    assert len(artifact.skipped_blocks) == 3 and any(artifact.skipped_blocks)
    assert all(set(step) <= set(blocks) and len(step) <= 6 for step in artifact.skipped_blocks)
    # the recorded fitness is that of the timesteps with those blocks skipped, scored again
    sampler, guidance = resolve_components(engine.models.get("shapes").spec, "dpmpp_2m", CFG5)
    again = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=3, teacher_steps=6,
                                  kind="paired_distance")
    plan = [[blocks.index(name) for name in step] for step in artifact.skipped_blocks]
    skipping = SkipPlanFitness(again, artifact.timesteps, blocks)
    assert skipping(plan) == pytest.approx(artifact.fitness.value, abs=1e-12)
    assert skipping(plan) != again(artifact.timesteps)  # skipping changed the images

    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(folder))
    out = tmp_path / "out"
    searched = json.dumps({"name": "searched", "id": "shapes-skip-3"})
    ok = CliRunner().invoke(main, ["generate", "-p", again.prompts[0], "--seed", "0", "--sampler", "dpmpp_2m",
                                   "--schedule", searched, "--guidance-scale", "5", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "results.json").read_text())["runs"][0]["steps"] == 3

    # stage 2 again from that artifact's timesteps (no stage 1), with a larger budget; its cost adds up
    again_args = ["search", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "5", "--out", "shapes-skip-3b",
                  "--dir", str(folder), "--images", "3", "--rescore-images", "3", "--teacher-steps", "6",
                  "--population", "4", "--select", "2", "--mutations", "1", "--crossovers", "1", "--epochs", "1",
                  "--skip-budget", "0.9", "--max-skip", "6", "--timesteps-from", "shapes-skip-3",
                  "--fitness", "paired_distance"]
    second = CliRunner().invoke(main, again_args)
    assert second.exit_code == 0, second.output
    more = load_artifact(folder / "shapes-skip-3b.json")
    assert more.timesteps == artifact.timesteps and 0 < more.search.unet_cost <= 0.9
    assert artifact.search.evaluations + 4 <= more.search.evaluations <= artifact.search.evaluations + 8
    refused = CliRunner().invoke(main, [a if a != "3" else "4" for a in again_args])
    assert refused.exit_code == 2
    assert "timesteps_from: 'shapes-skip-3' was searched for steps 3, not 4" in refused.output


def test_search_cli_refuses_a_sampler_without_explicit_timesteps(tmp_path: Path) -> None:
    run = CliRunner().invoke(main, ["search", "--steps", "4", "--sampler", "ddim", "--out", "x", "--dir",
                                    str(tmp_path)])
    assert run.exit_code == 2
    assert "schedule 'timesteps' cannot be used with sampler 'ddim'" in run.output
