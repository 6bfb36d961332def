"""DisBack on the gmm oracle: degradation path, backtracking schedule, targets loaded for real (spec §2.7)."""

from __future__ import annotations

import itertools

import pytest
import torch

from accel_diffusion.students.disback import DisBack, fit_denoiser, record_degradation, target_index
from accel_diffusion.students.networks import MlpDenoiser, MlpGenerator
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import StopTraining, TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

NET = {"dim": 2, "hidden": 32, "layers": 2, "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def setup() -> tuple[GmmTeacher, MlpDenoiser, MlpGenerator, list[dict[str, torch.Tensor]]]:
    teacher = GmmTeacher()
    rng = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    network = fit_denoiser(teacher, MlpDenoiser(**NET), 50, rng, batch_size=64)
    g0 = MlpGenerator(dim=2, hidden=32, layers=2)
    with torch.no_grad():  # a bad initial student: collapsed and shifted off the modes
        g0.net[-1].weight.mul_(0.05)
        g0.net[-1].bias.copy_(torch.tensor([2.5, 2.5]))
    path = record_degradation(network, g0, teacher, iterations=40, interval=10, rng=rng, batch_size=64)
    return teacher, network, g0, path


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] - b[k]).square().sum() for k in a)) ** 0.5


def test_path_starts_at_the_teacher_and_moves_away(setup: tuple) -> None:
    _, network, _, path = setup
    assert len(path) == 5  # s'_0 (teacher) + a checkpoint every 10 of 40 iterations
    assert _distance(path[0], network.state_dict()) == 0.0
    distances = [_distance(path[0], node) for node in path]
    assert distances[0] == 0.0 and all(b > a for a, b in itertools.pairwise(distances)), distances
    with pytest.raises(ValueError, match="interval"):
        record_degradation(network, setup[2], setup[0], iterations=5, interval=10, rng=torch.Generator())


def test_switch_schedule_is_modulo_and_ends_at_the_teacher() -> None:
    # N = 4: target s'_3 for generator steps 0..9, s'_2 for 10..19, ..., the teacher s'_0 from step 30 on
    assert [target_index(s, 5, 10) for s in (0, 9, 10, 19, 20, 29, 30, 1000)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert [target_index(s, 1, 10) for s in (0, 50)] == [0, 0]  # the baseline: the teacher throughout


def test_targets_are_loaded_and_resume_continues_the_schedule(setup: tuple, tmp_path) -> None:
    teacher, network, g0, path = setup
    method = DisBack(teacher, path, g0, NET, interval=4, batch_size=64, student_update_freq=2)
    assert _distance(method.fake_score.state_dict(), path[-1]) == 0.0  # the fake score starts at s'_N
    assert method.loaded_index == 3 and _distance(method.target.state_dict(), path[3]) == 0.0
    assert _distance(method.target.state_dict(), network.state_dict()) > 0  # not the teacher
    seen = []
    config = TrainConfig(iterations=40, seed=1, checkpoint_every=10, progress=False)
    train(method, config, on_iteration=lambda done, losses: seen.append(losses.get("target")))
    assert [int(v) for v in seen if v is not None] == [3] * 4 + [2] * 4 + [1] * 4 + [0] * 8
    assert _distance(method.target.state_dict(), network.state_dict()) == 0.0  # parameter-identical teacher
    assert not torch.equal(method.student.net[0].weight, g0.net[0].weight)  # trained a copy, not G0

    def stop(done: int, losses: dict) -> None:
        if done == 25:
            raise StopTraining

    first = DisBack(teacher, path, g0, NET, interval=4, batch_size=64, student_update_freq=2)
    train(first, config, out_dir=tmp_path, on_iteration=stop)
    resumed = DisBack(teacher, path, g0, NET, interval=4, batch_size=64, student_update_freq=2)
    train(resumed, config, out_dir=tmp_path)
    assert resumed.generator_steps == method.generator_steps == 20 and resumed.loaded_index == 0
    assert torch.equal(resumed.student.net[0].weight, method.student.net[0].weight)
