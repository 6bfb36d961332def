"""A gmm student as a first-class model: a diffusers directory, loaded by the registry and by plain diffusers,
sampled at 1 NFE, and refused (400 naming the field) with CFG, a multistep sampler or an untrained step count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from accel_diffusion.engine.engine import check_request
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.models.gmm import GmmPipeline
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest, Strategy
from accel_diffusion.students.export import save_gmm_student
from accel_diffusion.students.fdistill import FDistill
from accel_diffusion.students.networks import MlpGenerator
from accel_diffusion.students.teachers import GmmTeacher
from accel_diffusion.students.trainer import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

ENTRY = """
[models.gmm_student]
source = "local"
path = "{path}"
description = "a test student"
default_steps = 1
default_strategy = {{ sampler = {{ name = "ddim" }}, schedule = {{ name = "spacing", spacing = "trailing" }}, \
guidance = {{ name = "none" }}, student = {{ name = "one_step", steps = [1] }} }}
"""


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MlpGenerator, dict]:
    teacher = GmmTeacher()
    method = FDistill(teacher, divergence="js", hidden=32, layers=2, batch_size=64, warmup_iterations=5)
    config = TrainConfig(iterations=40, seed=3, progress=False)
    result = train(method, config)
    quality = teacher.evaluate(result.ema, n=500)
    out = tmp_path_factory.mktemp("student") / "gmm_fdistill"
    save_gmm_student(result.ema, out, teacher, name="gmm_fdistill", method="fdistill",
                     recipe={"method": method.config, "train": config.model_dump()},
                     command="accel-diffusion distill --method fdistill --teacher gmm --out DIR",
                     wall_seconds=result.wall_seconds, quality=quality)
    return out, result.ema, quality


def test_directory_is_diffusers_format_with_a_model_card(student_dir: tuple[Path, MlpGenerator, dict]) -> None:
    out, student, quality = student_dir
    assert (out / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    index = json.loads((out / "model_index.json").read_text())
    assert index["denoiser"] == ["accel_diffusion.students.networks", "MlpGenerator"]
    info = json.loads((out / "training_info.json").read_text())
    assert info["method"] == "fdistill" and info["steps"] == [1] and info["quality"] == quality
    assert info["recipe"]["method"]["divergence"] == "js" and info["recipe"]["train"]["seed"] == 3
    assert info["parameters"] == sum(p.numel() for p in student.parameters()) == 2 * 32 + 32 + 32 * 32 + 32 + 32 * 2 + 2
    card = (out / "README.md").read_text()
    assert "fdistill" in card and f"| mmd | {json.dumps(quality['mmd'])} |" in card and '"divergence": "js"' in card
    # plain diffusers: the network loads with from_pretrained and no extra arguments
    plain = MlpGenerator.from_pretrained(str(out / "denoiser"))
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(z).sample, student(z).sample)


def test_registry_loads_the_student_and_one_step_gives_its_samples(
        student_dir: tuple[Path, MlpGenerator, dict], tmp_path: Path) -> None:
    out, student, _ = student_dir
    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(path=out), encoding="utf-8")
    loaded = ModelRegistry.from_file(models).get("gmm_student")
    assert loaded.family == "gmm" and isinstance(loaded.pipeline, GmmPipeline)
    calls = []
    loaded.pipeline.denoiser.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples = loaded.pipeline(num_inference_steps=1, latents=z, output_type="pt").samples
    assert len(calls) == 1  # 1 NFE
    assert torch.equal(samples, student(z.float()).sample.double())  # the scheduler's one step is the x0 jump
    assert loaded.pipeline.scheduler.timesteps.tolist() == [999]


@pytest.mark.parametrize(("strategy", "steps", "field", "fragment"), [
    ({"guidance": {"name": "cfg", "scale": 5.0}}, None, "strategy.guidance", "'cfg' needs guidance branches"),
    ({"sampler": {"name": "dpmpp_2m"}}, None, "strategy.sampler", "'dpmpp_2m' cannot run a one-step student"),
    ({}, 4, "steps", "is 4; this student was trained for [1] step(s): send steps=1"),
    ({"student": {"name": "one_step", "steps": [1, 2]}}, 3, "steps", "trained for [1, 2] step(s)"),
])
def test_student_refuses_what_it_cannot_run(student_dir: tuple[Path, MlpGenerator, dict], tmp_path: Path,
                                            strategy: dict, steps: int | None, field: str, fragment: str) -> None:
    models = tmp_path / "models.toml"
    models.write_text(ENTRY.format(path=student_dir[0]), encoding="utf-8")
    spec = ModelRegistry.from_file(models).spec("gmm_student")
    check_request(spec, GenerationRequest.create(model="gmm_student", prompt="", strategy={}))  # defaults: fine
    check_request(spec, GenerationRequest.create(model="gmm_student", prompt="", steps=1,
                                                 strategy={"sampler": {"name": "lcm"}}))
    request = GenerationRequest.create(model="gmm_student", prompt="", steps=steps, strategy=strategy)
    with pytest.raises(InvalidRequestError) as err:
        check_request(spec, request)
    assert err.value.field == field and fragment in err.value.message
    assert isinstance(err.value, IncompatibleStrategyError) == field.startswith("strategy.")


def test_student_component_config_round_trips() -> None:
    strategy = Strategy.parse({"student": {"name": "one_step", "steps": [2, 1]}})
    assert strategy.student == {"name": "one_step", "steps": [2, 1], "samplers": ["ddim", "lcm"]}
    assert Strategy.parse(json.loads(strategy.to_json())) == strategy
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"student": {"name": "one_step", "samplers": ["dpmpp_2m"]}})
    assert err.value.field == "strategy.student.samplers"
