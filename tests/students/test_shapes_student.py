"""A ``shapes`` student: the teacher (CFG x0, ODE pairs through the engine's loop), the f-distill iteration on the
image teacher, and the export: a StableDiffusionPipeline directory that plain diffusers runs in one step to the
student's own sample and that the registry serves at 1 NFE through the engine (tiny runs: seconds, not the
shipped student)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest
from accel_diffusion.students.export import save_shapes_student
from accel_diffusion.students.shapes import STUDENT_TIMESTEP, ShapesFDistill, ShapesTeacher
from accel_diffusion.students.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

ENTRY = """
[models.shapes_student]
source = "local"
path = "{path}"
default_steps = 1
default_strategy = {{ sampler = {{ name = "ddim" }}, schedule = {{ name = "spacing", spacing = "trailing" }}, \
guidance = {{ name = "none" }}, student = {{ name = "one_step", steps = [1] }} }}
"""


@pytest.fixture(scope="module")
def teacher() -> ShapesTeacher:
    return ShapesTeacher()


@pytest.fixture(scope="module")
def pairs(teacher: ShapesTeacher) -> dict[str, torch.Tensor]:
    return teacher.ode_pairs(8, seed=5, steps=4, batch_size=4)


def test_teacher_pairs_are_the_engines_cfg_samples(teacher: ShapesTeacher, pairs: dict[str, torch.Tensor]) -> None:
    assert pairs["z"].shape == pairs["x0"].shape == (8, 4, 8, 8)
    assert pairs["prompt"].tolist() == list(range(8))
    # a pair is the engine's own 4-step DDIM CFG-5 sample from the same noise (the engine seeds one generator
    # per image; ode_pairs draws all z from one generator, so compare the loop's endpoint directly)
    from accel_diffusion.students.shapes import TEACHER_STRATEGY

    engine = Engine(ModelRegistry.default())
    result = engine.generate(GenerationRequest.create(model="shapes", prompt=teacher.prompts[0], seed=11, steps=4,
                                                      strategy=TEACHER_STRATEGY))
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    single = _pair_from(teacher, z, 0, steps=4)
    assert np.abs(teacher.decode(single).astype(int) - result.to_uint8().astype(int)).max() <= 1
    assert result.nfe == 8  # 4 steps x (cond + uncond)


def _pair_from(teacher: ShapesTeacher, z: torch.Tensor, prompt: int, steps: int) -> torch.Tensor:
    """The teacher's ODE endpoint from a given z (the loop of ode_pairs, for one row)."""
    from accel_diffusion.engine.engine import prepare_strategy
    from accel_diffusion.engine.loop import denoise
    from accel_diffusion.strategy import Strategy
    from accel_diffusion.students.shapes import TEACHER_STRATEGY

    prepared = prepare_strategy(teacher.loaded.spec, Strategy.parse(TEACHER_STRATEGY), steps)
    scheduler = prepared.sampler.make_scheduler(teacher.loaded.scheduler_config, prepared.schedule.scheduler_options())
    prepared.schedule.set_timesteps(scheduler, steps, teacher.loaded.device)
    prepared.guidance.begin(None)
    cond = teacher.loaded.prompt_encoder.conditioning([teacher.prompts[prompt]], None, True, None)
    with torch.no_grad():
        return denoise(teacher.unet, z, scheduler, scheduler.timesteps, prepared.guidance, cond)


def test_teacher_x0_is_cfg_5_in_x0_space(teacher: ShapesTeacher) -> None:
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([100, 500, 900])
    prompt = torch.tensor([0, 7, 195])
    with torch.no_grad():
        eps_c = teacher.unet(x_t, t, encoder_hidden_states=teacher.cond[prompt]).sample
        eps_u = teacher.unet(x_t, t, encoder_hidden_states=teacher.uncond.expand(3, -1, -1)).sample
    acp = teacher.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = (x_t - (1 - acp).sqrt() * (eps_u + 5.0 * (eps_c - eps_u))) / acp.sqrt()
    torch.testing.assert_close(teacher.x0(x_t, t, prompt), expected, rtol=1e-4, atol=1e-4)
    # the diffusers schedule: alphas_cumprod of the model's own scheduler config
    assert float(teacher.alphas_cumprod[999]) == pytest.approx(0.0047, abs=2e-4)


def test_regression_then_distribution_matching_iterations(teacher: ShapesTeacher,
                                                          pairs: dict[str, torch.Tensor]) -> None:
    method = ShapesFDistill(teacher, pairs, batch_size=8, regression_iterations=12, lr_regression=3e-5,
                            student_update_freq=2)
    before = _pair_loss(teacher, method.student, pairs)
    result = train(method, TrainConfig(iterations=14, seed=0, ema_decay=0.9, progress=False))
    after = _pair_loss(teacher, result.student, pairs)
    assert after < 0.8 * before, (before, after)  # measured: 0.90 -> 0.55 on these 8 pairs
    # iteration 12 updated the student with the f-divergence term (mean-1 weights), iteration 13 the critics
    assert set(result.last_losses) == {"loss_dsm", "loss_disc"}
    assert float(method.weight.bin_means.sum()) != pytest.approx(10.0)  # the ratio bins were updated


def _pair_loss(teacher: ShapesTeacher, student: torch.nn.Module, pairs: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(teacher.student_x0(student, pairs["z"], pairs["prompt"]),
                                                  pairs["x0"]))


@pytest.fixture(scope="module")
def student_dir(teacher: ShapesTeacher, pairs: dict[str, torch.Tensor],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    method = ShapesFDistill(teacher, pairs, batch_size=4, regression_iterations=3)
    result = train(method, TrainConfig(iterations=3, seed=1, progress=False))
    out = tmp_path_factory.mktemp("shapes_student") / "shapes_tiny_fdistill"
    save_shapes_student(result.student, out, teacher.loaded.pipeline, teacher.loaded.scheduler_config,
                        name=out.name, method="fdistill", recipe={"method": method.config},
                        command="accel-diffusion distill --method fdistill --teacher shapes --out DIR",
                        wall_seconds=1.0, quality={"prompt_accuracy": 0.5})
    # the directory holds the UNet in float16 (diffusers upcasts it to float32 on load): compare with those weights
    return out, copy.deepcopy(result.student).half().float()


def test_plain_diffusers_runs_the_directory_in_one_step_to_the_students_sample(
        teacher: ShapesTeacher, student_dir: tuple[Path, torch.nn.Module]) -> None:
    out, student = student_dir
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == [1] and info["parameters"] == 3_984_068 and info["teacher"] == "shapes"
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # half the bytes on disk
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # no extra arguments, on CPU
    assert pipe.unet.dtype == torch.float32
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = [teacher.prompts[4], teacher.prompts[100]]
    latents = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [STUDENT_TIMESTEP]
    with torch.no_grad():
        expected = teacher.student_x0(student, z, torch.tensor([4, 100]))
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def test_registry_serves_the_student_at_one_nfe(teacher: ShapesTeacher, student_dir: tuple[Path, torch.nn.Module],
                                                tmp_path: Path) -> None:
    out, student = student_dir
    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(path=out), encoding="utf-8")
    engine = Engine(ModelRegistry.from_file(models))
    result = engine.generate(GenerationRequest.create(model="shapes_student", prompt=teacher.prompts[9], seed=21))
    assert (result.nfe, result.forward_passes, result.steps) == (1, 1, 1)
    z = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        expected = teacher.decode(teacher.student_x0(student, z, torch.tensor([9])))
    assert np.abs(result.to_uint8().astype(int) - expected.astype(int)).max() <= 1
    assert result.images.shape == (1, 32, 32, 3) and result.timings["denoise"] > 0


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"guidance": "cfg", "mode": "txt2img", "t_index_list": [0]}, "guidance"),
    ({"guidance": "none", "mode": "img2img", "t_index_list": [0]}, "mode"),
    ({"guidance": "none", "mode": "txt2img", "t_index_list": [0, 16]}, "t_index_list"),
])
def test_a_stream_session_refuses_what_the_student_cannot_run(student_dir: tuple[Path, torch.nn.Module], tmp_path: Path,
                                                              kwargs: dict, field: str) -> None:
    from accel_diffusion.errors import InvalidRequestError
    from accel_diffusion.stream import StreamSession

    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(path=student_dir[0]), encoding="utf-8")
    loaded = ModelRegistry.from_file(models).get("shapes_student")
    with pytest.raises(InvalidRequestError) as err:
        StreamSession(loaded, "a red circle", **kwargs)
    assert err.value.field == field


def test_a_txt2img_stream_of_the_student_is_its_one_step_image(teacher: ShapesTeacher, tmp_path: Path,
                                                               student_dir: tuple[Path, torch.nn.Module]) -> None:
    from accel_diffusion.stream import StreamSession

    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(path=student_dir[0]), encoding="utf-8")
    loaded = ModelRegistry.from_file(models).get("shapes_student")
    session = StreamSession(loaded, teacher.prompts[3], t_index_list=[0], guidance="none", mode="txt2img",
                            seed=0, vae="full")
    frame = session()  # one slot: no warm-up
    assert frame is not None and (session.state.nfe, session.state.unet_calls) == (1, 1)
    with torch.no_grad():
        expected = teacher.decode(teacher.student_x0(student_dir[1], session.init_noise[:1], torch.tensor([3])))
    assert np.abs(frame.astype(int) - expected[0].astype(int)).max() <= 1


def test_cosine_regression_schedule_falls_from_lr_regression_to_lr_student(teacher: ShapesTeacher,
                                                                           pairs: dict[str, torch.Tensor]) -> None:
    method = ShapesFDistill(teacher, pairs, batch_size=2, regression_iterations=4, lr_regression=3e-4,
                            lr_student=1e-5, student_update_freq=2, regression_schedule="cosine")
    rng = torch.Generator().manual_seed(0)
    seen = []
    for iteration in range(5):
        method.train_step(iteration, rng)
        seen.append(method.optimizers()["student"].param_groups[0]["lr"])
    assert seen == pytest.approx([3e-4, 2.57530e-4, 1.55e-4, 5.24695e-5, 1e-5], rel=1e-4)
    assert json.loads(json.dumps(method.config))["regression_schedule"] == "cosine"
    with pytest.raises(ValueError, match="regression_schedule"):
        ShapesFDistill(teacher, pairs, regression_schedule="linear")
