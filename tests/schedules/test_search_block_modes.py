"""Stage 2 with a mode per block (``--skip-mode best``): each allowed block is probed alone in each mode, skipped in
the mode that scored best, generation 0 holds the greedy plans of the probe's best blocks (``greedy_plan``), the cost
model counts what a skipped block still computes; stage 2 may start from a hand-made schedule's timesteps."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.eval.schedule_fitness import ShapesScheduleFitness, SkipPlanFitness
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.schedules.autodiffusion import SkipPlanSearch, SkipSpace, greedy_plan
from accel_diffusion.schedules.search_command import resolve_components
from accel_diffusion.schedules.searched import load_artifact

pytestmark = pytest.mark.usefixtures("single_thread")

BLOCKS = ["down_blocks.0.resnets.0", "mid_block.attentions.0", "up_blocks.0.resnets.1"]


def test_greedy_plan_skips_the_order_at_every_step_until_the_budget_fits() -> None:
    costs = (0.05, 0.10, 0.20, 0.15)
    space = SkipSpace(3, 4, budget=0.8 * 3, max_skip=3, block_costs=costs, overhead=0.5)
    assert greedy_plan(space, [3, 1, 0, 2]) == ((1, 3), (1, 3), (1, 3))  # 0.15 saves too little; 0.15 + 0.10 fits
    assert greedy_plan(space, [2, 3]) == ((2,),) * 3
    assert space.check(greedy_plan(space, [0, 1, 3, 2])) == ((0, 1, 3),) * 3
    with pytest.raises(ValueError, match=r"the budget is 2\.4"):
        greedy_plan(space, [0])  # 0.05 at every step is not enough
    tight = SkipSpace(2, 4, budget=0.85 * 2, max_skip=1, block_costs=costs, overhead=0.5)
    assert greedy_plan(tight, [3, 2]) == ((3,), (3,))
    with pytest.raises(ValueError, match=r"the budget is 1\.7"):
        greedy_plan(tight, [0, 1])  # max_skip 1: block 1 finds no room after block 0


def test_generation_zero_holds_the_greedy_seeds_first() -> None:
    space = SkipSpace(3, 4, budget=0.8 * 3, max_skip=3, block_costs=(0.05, 0.10, 0.20, 0.15), overhead=0.5)
    seeds = [greedy_plan(space, [3, 1, 0, 2]), greedy_plan(space, [2, 3])]
    scored: list = []
    search = SkipPlanSearch(space, lambda plan: scored.append(plan) or float(len(scored)), seeds=seeds)
    search.config = type(search.config)(population=6, select=2, mutations=2, crossovers=1, epochs=0)
    search.run()
    assert scored[:2] == seeds and len(scored) == 6


def test_search_cli_best_mode_per_block_from_a_hand_made_grid(tmp_path: Path) -> None:
    folder = tmp_path / "schedules"
    args = ["search", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "5", "--out", "shapes-best-3",
            "--dir", str(folder), "--images", "3", "--rescore-images", "3", "--teacher-steps", "6",
            "--population", "4", "--select", "2", "--mutations", "1", "--crossovers", "1", "--epochs", "1",
            "--skip-budget", "0.95", "--max-skip", "3",
            "--timesteps-from", '{"name": "spacing", "spacing": "trailing"}',
            "--fitness", "paired_distance", "--skip-mode", "best", "--skip-blocks", ",".join(BLOCKS)]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    artifact = load_artifact(folder / "shapes-best-3.json")
    assert sorted(p.name for p in folder.iterdir()) == ["shapes-best-3.json"]  # state and probe files removed
    engine = Engine(ModelRegistry.default())
    loaded = engine.models.get("shapes")
    sampler, guidance = resolve_components(loaded.spec, "dpmpp_2m", {"name": "cfg", "scale": 5})
    from accel_diffusion.schedules.autodiffusion import SearchSpace
    from accel_diffusion.schedules.search_command import hand_made_grids

    trailing = hand_made_grids(dict(loaded.scheduler_config), sampler, SearchSpace(3),
                               ({"name": "spacing", "spacing": "trailing"},))
    assert artifact.timesteps == list(trailing[0]) == [999, 666, 332]
    assert artifact.skipped_blocks[0] == [] and any(artifact.skipped_blocks)
    assert 0 < artifact.search.unet_cost <= 0.95 and artifact.search.evaluations >= 4 + 6  # the probe's 6 plans counted

    fitness = ShapesScheduleFitness(engine, sampler=sampler, guidance=guidance, images=3, teacher_steps=6,
                                    kind="paired_distance")
    probe = {b: {m: SkipPlanFitness(fitness, artifact.timesteps, [b], m, 1)([[0], [0]]) for m in ("drop", "residual")}
             for b in BLOCKS}
    best = {b: min(("drop", "residual"), key=lambda m: probe[b][m]) for b in BLOCKS}
    used = {b for step in artifact.skipped_blocks for b in step}
    assert artifact.block_modes == {b: best[b] for b in used}  # each skipped block in its probe-best mode
    plan = [[BLOCKS.index(b) for b in step] for step in artifact.skipped_blocks[1:]]
    again = SkipPlanFitness(fitness, artifact.timesteps, BLOCKS, best, from_step=1)  # type: ignore[arg-type]
    assert again(plan) == pytest.approx(artifact.fitness.value, abs=1e-12)

    refused = CliRunner().invoke(main, [*args, "--probe-modes", "drop,cache"])
    assert refused.exit_code == 2 and "probe_modes" in refused.output, refused.output
