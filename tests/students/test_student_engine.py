"""A model whose registry entry names the ``one_step`` student runs through the one engine at 1 NFE, and the
server refuses what the student cannot run with a 400 naming the field (the tiny SD pipeline stands in for a
distilled UNet: what is tested is the engine and server path, not image quality)."""

from __future__ import annotations

from pathlib import Path

import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair

ENTRY = """
[models.tiny-student]
source = "local"
path = "{path}"
default_steps = 1
default_width = 32
default_height = 32
default_strategy = {{ sampler = {{ name = "ddim" }}, schedule = {{ name = "spacing", spacing = "trailing" }}, \
guidance = {{ name = "none" }}, student = {{ name = "one_step", steps = [1, 2] }} }}
"""


@pytest.fixture(scope="module")
def student_models_file(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("students") / "models.toml"
    path.write_text(ENTRY.format(path=tiny_sd_dir), encoding="utf-8")
    return path


def test_student_model_runs_at_one_nfe_through_the_engine(student_models_file: Path) -> None:
    engine = Engine(ModelRegistry.from_file(student_models_file))
    result = engine.generate(GenerationRequest.create(model="tiny-student", prompt="a red circle", seed=0))
    assert (result.nfe, result.forward_passes, result.steps) == (1, 1, 1)
    assert result.strategy.student == {"name": "one_step", "steps": [1, 2], "samplers": ["ddim", "lcm"]}
    assert result.images.shape == (1, 32, 32, 3) and result.timings["denoise"] > 0
    two = engine.generate(GenerationRequest.create(model="tiny-student", prompt="a red circle", seed=0, steps=2))
    assert (two.nfe, two.steps) == (2, 2)


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({"strategy": {"guidance": {"name": "cfg", "scale": 5.0}}}, "strategy.guidance", "needs guidance branches"),
    ({"guidance_scale": 5.0}, "strategy.guidance", "needs guidance branches"),
    ({"strategy": {"sampler": {"name": "dpmpp_2m"}}}, "strategy.sampler", "cannot run a one-step student"),
    ({"steps": 4}, "steps", "trained for [1, 2] step(s): send steps=1 (or one of [1, 2])"),
])
def test_server_refuses_what_the_student_cannot_run(student_models_file: Path, body: dict, param: str,
                                                    fragment: str) -> None:
    settings = make_settings(student_models_file, served_models=["tiny-student"])
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/images/generations", json={"model": "tiny-student", "prompt": "a", **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and fragment in error["message"], error
        ok = client.post("/v1/images/generations", json={"model": "tiny-student", "prompt": "a", "seed": 1})
        assert ok.status_code == 200, ok.text
