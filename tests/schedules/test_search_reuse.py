"""`accel-diffusion search` stage 2 in a reuse mode on the shipped `shapes` model (tiny settings): the first step runs
every block, only the allowed blocks are skipped, the plan fits the budget, the recorded fitness is the reused
images' and the artifact says its mode; an unknown block is refused naming --skip-blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness, SkipPlanFitness
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.search_command import resolve_components
from accel_diffusion.schedules.searched import SearchCost, SearchedArtifact, SearchFitness, load_artifact

pytestmark = pytest.mark.usefixtures("single_thread")

DEEP = ["down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "mid_block.resnets.0", "mid_block.attentions.0",
        "mid_block.resnets.1", "up_blocks.0.resnets.0", "up_blocks.0.attentions.0", "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1"]
TIMESTEPS = [899, 600, 300]


def stage_one(folder: Path) -> None:
    """A stage-1 artifact to start stage 2 from (its timesteps as if searched)."""
    SearchedArtifact(id="shapes-dpmpp-3", model="shapes", sampler={"name": "dpmpp_2m"},
                     guidance={"name": "cfg", "scale": 5.0}, steps=3, timesteps=TIMESTEPS,
                     fitness=SearchFitness(kind="paired_distance", value=0.2, samples=3),
                     search=SearchCost(evaluations=5, wall_time_s=1.0, command="accel-diffusion search ..."),
                     seed=0).save(folder)


@pytest.mark.parametrize("mode", ["reuse", "residual"])
def test_search_cli_stage_two_in_a_reuse_mode(tmp_path: Path, mode: str) -> None:
    folder = tmp_path / "schedules"
    stage_one(folder)
    args = ["search", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "5", "--out", "shapes-reuse-3",
            "--dir", str(folder), "--images", "3", "--rescore-images", "3", "--teacher-steps", "6",
            "--population", "4", "--select", "2", "--mutations", "1", "--crossovers", "1", "--epochs", "1",
            "--skip-budget", "0.8", "--max-skip", "9", "--timesteps-from", "shapes-dpmpp-3", "--fitness",
            "paired_distance", "--skip-mode", mode, "--skip-blocks", ",".join(DEEP)]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    artifact = load_artifact(folder / "shapes-reuse-3.json")
    assert not list(folder.glob("*state"))
    assert artifact.skip_mode == mode and artifact.timesteps == TIMESTEPS
    assert artifact.skipped_blocks[0] == [] and any(artifact.skipped_blocks)  # the first step fills the cache
    assert all(set(step) <= set(DEEP) for step in artifact.skipped_blocks)
    assert 0 < artifact.search.unet_cost <= 0.8 and artifact.search.skip_budget == 0.8
    assert 5 + 4 <= artifact.search.evaluations <= 5 + 8

    engine = Engine(ModelRegistry.default())
    sampler, guidance = resolve_components(engine.models.get("shapes").spec, "dpmpp_2m", {"name": "cfg", "scale": 5})
    again = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=3, teacher_steps=6,
                                  kind="paired_distance")
    plan = [[DEEP.index(name) for name in step] for step in artifact.skipped_blocks[1:]]
    reusing = SkipPlanFitness(again, TIMESTEPS, DEEP, mode, from_step=1)  # type: ignore[arg-type]
    assert reusing.names(plan) == artifact.skipped_blocks
    assert reusing(plan) == pytest.approx(artifact.fitness.value, abs=1e-12)
    assert reusing(plan) != SkipPlanFitness(again, TIMESTEPS, DEEP, "drop", from_step=1)(plan)

    refused = CliRunner().invoke(main, [*args[:-1], "up_blocks.7.resnets.0"])
    assert refused.exit_code == 2
    assert "skip_blocks: 'up_blocks.7.resnets.0' is not a skippable block of model 'shapes'" in refused.output
