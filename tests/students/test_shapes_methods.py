"""DisBack and SlimFlow on the ``shapes`` teacher (tiny runs: seconds, not the shipped students).

SlimFlow's small UNet predicts the data end (``ShapesDataFlow``): its one step is a plain diffusers DDIM step with
``prediction_type="sample"`` at t = 999, so the exported directory runs in plain diffusers to the student's sample.
DisBack's degradation path starts at the teacher, its nodes differ from it, and backtracking ends on the teacher
itself; a resumed backtracking run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from accel_diffusion.students.disback import ShapesDisBack, record_shapes_degradation, target_index
from accel_diffusion.students.distill import SHAPES_SLIMFLOW
from accel_diffusion.students.export import save_shapes_student
from accel_diffusion.students.shapes import ShapesRegression, ShapesTeacher
from accel_diffusion.students.slimflow import AnnealingReflow, FlowGuidedDistillation, ShapesDataFlow
from accel_diffusion.students.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def teacher() -> ShapesTeacher:
    return ShapesTeacher()


@pytest.fixture(scope="module")
def pairs(teacher: ShapesTeacher) -> dict[str, torch.Tensor]:
    return teacher.ode_pairs(8, seed=5, steps=2, batch_size=8)


def _small_network(teacher: ShapesTeacher) -> dict:
    network = {k: v for k, v in teacher.unet.config.items() if not k.startswith("_")}
    network.update(block_out_channels=SHAPES_SLIMFLOW["block_out_channels"],
                   norm_num_groups=SHAPES_SLIMFLOW["norm_num_groups"])
    return network


def test_data_flow_velocity_and_one_step(teacher: ShapesTeacher) -> None:
    flow = ShapesDataFlow(teacher.cond)
    torch.manual_seed(0)
    net = flow.build(_small_network(teacher))
    x = torch.randn(3, 4, 8, 8)
    cond = torch.tensor([0, 50, 195])
    t = torch.tensor([0.0, 0.5, 0.99])
    with torch.no_grad():
        data = net(x, (1 - t) * 999, encoder_hidden_states=teacher.cond[cond]).sample
        velocity = flow.velocity(net, x, t, cond)
        one = flow.one_step(net, x, cond)
        at_999 = net(x, torch.full((3,), 999), encoder_hidden_states=teacher.cond[cond]).sample
    gap = torch.tensor([1.0, 0.5, 0.05]).reshape(-1, 1, 1, 1)  # 1 - t, clamped at min_gap = 0.05
    torch.testing.assert_close(velocity, (data - x) / gap)
    torch.testing.assert_close(one, at_999)


def test_slimflow_student_is_a_quarter_of_the_unet_and_plain_diffusers_runs_it(
        teacher: ShapesTeacher, pairs: dict[str, torch.Tensor], tmp_path: Path) -> None:
    flow = ShapesDataFlow(teacher.cond)
    triple = (pairs["z"], pairs["x0"], pairs["prompt"])
    reflow = AnnealingReflow(triple, _small_network(teacher), horizon=2, batch_size=4, lr=5e-4, flow=flow)
    stage1 = train(reflow, TrainConfig(iterations=4, seed=0, progress=False))
    assert stage1.last_losses["beta"] == 0.0  # annealed to the teacher's pairs
    distillation = FlowGuidedDistillation(triple, stage1.ema, batch_size=4, lr=1e-4, flow=flow)
    before = _pair_loss(flow, distillation.student, pairs)
    result = train(distillation, TrainConfig(iterations=3, seed=1, progress=False))
    assert set(result.last_losses) == {"student_updated", "loss_pair", "loss_guided"}
    assert _pair_loss(flow, result.student, pairs) != before
    student = copy.deepcopy(result.student).half().float()  # the weights the float16 directory holds
    parameters = sum(p.numel() for p in student.parameters())
    assert parameters == 933_328 and parameters <= sum(p.numel() for p in teacher.unet.parameters()) / 4
    out = tmp_path / "shapes_tiny_slimflow"
    save_shapes_student(student, out, teacher.loaded.pipeline, teacher.loaded.scheduler_config, name=out.name,
                        method="slimflow", recipe={}, command="accel-diffusion distill --method slimflow",
                        wall_seconds=1.0, quality={}, prediction_type="sample", vae=teacher.loaded.tiny_vae)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # no extra arguments, on CPU
    assert pipe.scheduler.config.prediction_type == "sample"
    assert type(pipe.vae).__name__ == "AutoencoderTiny" and pipe.vae.dtype == torch.float32  # float16 on disk
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = pipe([teacher.prompts[4], teacher.prompts[100]], num_inference_steps=1, guidance_scale=1.0,
                   latents=z, output_type="latent").images
    with torch.no_grad():
        expected = flow.one_step(student, z, torch.tensor([4, 100]))
        via_teacher = teacher.student_x0(student, z, torch.tensor([4, 100]), "sample")
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_teacher, expected)


def _pair_loss(flow: ShapesDataFlow, student: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(flow.one_step(student, pairs["z"], pairs["prompt"]), pairs["x0"]))


@pytest.fixture(scope="module")
def g0_and_path(teacher: ShapesTeacher, pairs: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, list]:
    g0 = train(ShapesRegression(teacher, pairs, iterations=2, batch_size=2), TrainConfig(iterations=2, seed=0,
                                                                                        progress=False)).student
    path = record_shapes_degradation(teacher, g0, iterations=4, interval=2, batch_size=2, lr=1e-3,
                                     rng=torch.Generator().manual_seed(1))
    return g0, path


def test_degradation_path_starts_at_the_teacher_and_moves_away(teacher: ShapesTeacher,
                                                               g0_and_path: tuple[torch.nn.Module, list]) -> None:
    _, path = g0_and_path
    assert len(path) == 3
    teacher_state = teacher.unet.state_dict()
    assert all(torch.equal(path[0][k], teacher_state[k]) for k in teacher_state)
    distances = [sum(float((node[k] - teacher_state[k]).float().pow(2).sum()) for k in teacher_state) for node in path]
    assert distances[0] == 0.0 < distances[1] < distances[2]


def test_backtracking_walks_the_path_back_to_the_teacher(teacher: ShapesTeacher, pairs: dict[str, torch.Tensor],
                                                         g0_and_path: tuple[torch.nn.Module, list]) -> None:
    g0, path = g0_and_path
    method = ShapesDisBack(teacher, path, g0, pairs, interval=1, batch_size=2, student_update_freq=2)
    assert method.loaded_index == 1  # s'_{N-1}: the fake score starts at s'_N
    assert all(torch.equal(method.fake_score.state_dict()[k], path[2][k]) for k in path[2])
    train(method, TrainConfig(iterations=4, seed=0, progress=False))  # generator steps at iterations 0 and 2
    assert method.generator_steps == 2 and target_index(2, 3, 1) == 0
    method._load_target()
    teacher_state = teacher.unet.state_dict()
    assert method.loaded_index == 0
    assert all(torch.equal(method.target.state_dict()[k], teacher_state[k]) for k in teacher_state)


def test_backtracking_resumed_after_a_kill_equals_an_uninterrupted_run(
        teacher: ShapesTeacher, pairs: dict[str, torch.Tensor], g0_and_path: tuple[torch.nn.Module, list],
        tmp_path: Path) -> None:
    g0, path = g0_and_path

    def method() -> ShapesDisBack:
        return ShapesDisBack(teacher, path, g0, pairs, interval=1, batch_size=2, student_update_freq=2)

    whole = train(method(), TrainConfig(iterations=4, seed=3, progress=False))
    train(method(), TrainConfig(iterations=2, seed=3, checkpoint_every=2, progress=False), out_dir=tmp_path)
    resumed_method = method()
    resumed = train(resumed_method, TrainConfig(iterations=4, seed=3, checkpoint_every=2, progress=False),
                    out_dir=tmp_path)
    assert resumed.resumed_from == 2 and resumed_method.generator_steps == 2
    for key, value in whole.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
