"""DisBack vs the same loss without backtracking, from the same bad initialisation (acceptance line 4).

Teacher: an MLP (3×128) fitted to the gmm oracle's x0 (1,500 iterations) — DisBack needs a teacher network
whose weights it can copy. Initial student G0: collapsed (×0.05) and shifted to (2.5, 2.5), off every mode.
Stage 1: 600 DSM iterations on G0 samples, a node every 100 (7 nodes). Stage 2: 40 generator steps a node,
then the teacher. Baseline: the same DMD loss, target = teacher from the start, fake score initialised from
the teacher. Both: 1,500 iterations = 500 generator steps, same seed; MMD² of the EMA student every 50
generator steps. Measured at the commit (a 2-core AMD EPYC): DisBack 6.45 → 0.115 at step 500 (first below 0.3 at
step 450); the baseline 0.604 at step 50, then stuck near 0.52 (0.526 at step 500, mode-weight error 0.42). Stage 1
costs 600 fake-score iterations and no generator step.

Whether a DisBack run escapes the baseline's optimum depends on float rounding: on a 2-core Intel Xeon (AVX-512)
the same seed-0 run stays at 0.524 (the baseline's bit for bit the same as on the EPYC). Over training seeds 0-4
there, DisBack's final MMD² was 0.524 / 0.097 / 0.071 / 0.082 / 0.522 (below 0.3 first at steps 400-450 in the three
that escape) and the baseline's 0.526 / 0.527 / 0.530 / 0.532 / 0.523 (never below 0.3). So the test runs the
five seeds and asserts what holds on both machines: backtracking escapes in at least two of them within 500
generator steps and ends below 0.2 in one; the baseline escapes in none.
"""

from __future__ import annotations

import pytest
import torch

from accel_diffusion.students.disback import DisBack, fit_denoiser, record_degradation
from accel_diffusion.students.networks import MlpDenoiser, MlpGenerator
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

TARGET_MMD = 0.3
SEEDS = range(5)  # the training seeds (noise, timesteps); the teacher, G0 and the path are fixed


def _steps_to(history: list[dict], target: float) -> int | None:
    return next((h["iteration"] // 3 for h in history if h["mmd"] < target), None)


def test_backtracking_reaches_the_target_in_fewer_generator_steps() -> None:
    teacher = GmmTeacher()
    network = {"dim": 2, "hidden": 128, "layers": 3, "num_train_timesteps": 1000}
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher_network = fit_denoiser(teacher, MlpDenoiser(**network), 1500, rng)
    torch.manual_seed(1)
    g0 = MlpGenerator(dim=2, hidden=64, layers=3)
    with torch.no_grad():
        g0.net[-1].weight.mul_(0.05)
        g0.net[-1].bias.copy_(torch.tensor([2.5, 2.5]))
    assert teacher.evaluate(g0, n=500)["mmd"] > 6
    path = record_degradation(teacher_network, g0, teacher, iterations=600, interval=100, rng=rng)

    def evaluate(student: torch.nn.Module) -> dict:
        return {"mmd": teacher.evaluate(student, n=500)["mmd"]}

    histories: dict[str, list[list[dict]]] = {"disback": [], "baseline": []}
    for seed in SEEDS:
        config = TrainConfig(iterations=1500, seed=seed, eval_every=150, progress=False)
        for name, nodes in (("disback", path), ("baseline", path[:1])):
            histories[name].append(train(DisBack(teacher, nodes, g0, network, interval=40), config,
                                         evaluate=evaluate).history)
    reached = {name: [_steps_to(h, TARGET_MMD) for h in runs] for name, runs in histories.items()}
    finals = {name: [h[-1]["mmd"] for h in runs] for name, runs in histories.items()}
    # backtracking escapes the baseline's local optimum in some runs, within 500 generator steps ...
    escaped = [steps for steps in reached["disback"] if steps is not None and steps <= 500]
    assert len(escaped) >= 2 and min(finals["disback"]) < 0.2, (reached, finals)
    # ... and the same loss without it never does, from the same start and seeds
    assert reached["baseline"] == [None] * len(SEEDS) and min(finals["baseline"]) > 0.4, (reached, finals)
