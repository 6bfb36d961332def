"""The shipped ``shapes`` students: listed by ``accel-diffusion models``, served by name at 1 NFE through the engine,
the CLI and the server (a 400 naming the field for CFG, a multistep sampler or 4 steps), run by plain diffusers
with no extra arguments, and inside the repository's 80 MB budget for shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accel_diffusion.server import create_app
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from server_clients import make_settings

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")

BUILTIN = Path(__file__).resolve().parents[2] / "accel_diffusion" / "models" / "builtin"
SHIPPED = ["shapes_fdistill", "shapes_disback", "shapes_slimflow"]
BUDGET_BYTES = 80 * 1024 * 1024


def test_models_lists_the_students_as_available() -> None:
    result = CliRunner().invoke(main, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["id"]: row for row in json.loads(result.output)}
    for name in SHIPPED:
        assert rows[name]["available"] and rows[name]["default_steps"] == 1
        assert rows[name]["default_strategy"]["student"] == {"name": "one_step", "steps": [1],
                                                             "samplers": ["ddim", "lcm"]}
        assert rows[name]["default_strategy"]["guidance"] == {"name": "none"}


@pytest.mark.parametrize("name", SHIPPED)
def test_student_by_name_gives_one_step_images_that_follow_the_prompt(name: str) -> None:
    from accel_diffusion.eval.shapes_judge import ShapesJudge

    engine = Engine(ModelRegistry.default())
    prompts = ["a red circle on a blue background", "a green square on a white background",
               "a yellow triangle on a black background", "a blue cross on a gray background"]
    result = engine.generate(GenerationRequest.create(model=name, prompt=prompts, seed=0))
    assert (result.nfe, result.forward_passes, result.steps) == (1, 1, 1)
    assert set(result.timings) >= {"denoise", "decode", "total"}
    truth = [("circle", "red", "blue"), ("square", "green", "white"), ("triangle", "yellow", "black"),
             ("cross", "blue", "gray")]
    predicted = ShapesJudge.load().predict(result.to_uint8())
    # over the 196 prompts the shipped student's accuracy is 0.60 (colour 0.98, background 1.00, shape 0.61):
    # see its model card
    assert sum(p[1:] == t[1:] for p, t in zip(predicted, truth)) >= 3, predicted
    assert sum(p == t for p, t in zip(predicted, truth)) >= 2, predicted


@pytest.mark.parametrize("name", SHIPPED)
def test_plain_diffusers_runs_the_shipped_directory(name: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(str(BUILTIN / name))  # no extra arguments, CPU
    # SlimFlow's small student decodes with the teacher's tiny autoencoder (a third of the decode time)
    assert type(pipe.vae).__name__ == ("AutoencoderTiny" if name == "shapes_slimflow" else "AutoencoderKL")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = pipe("a red circle on a blue background", num_inference_steps=1, guidance_scale=1.0, latents=z,
                 output_type="np").images
    engine = Engine(ModelRegistry.default())
    ours = engine.generate(GenerationRequest.create(model=name, prompt="a red circle on a blue background", seed=0))
    assert np.abs((image * 255).round().astype(int) - ours.to_uint8().astype(int)).max() <= 2


def test_cli_generate_and_server_refusals(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["generate", "-m", "shapes_fdistill", "-p", "a red circle on a blue background",
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert run["nfe"] == 1 and run["steps"] == 1, run
    refused = CliRunner().invoke(main, ["generate", "-m", "shapes_fdistill", "-p", "a", "--guidance-scale", "5",
                                        "--out", str(tmp_path / "out2")])
    assert refused.exit_code != 0 and "strategy.guidance" in refused.output, refused.output
    settings = make_settings(None, served_models=["shapes_fdistill"])
    with TestClient(create_app(settings)) as client:
        for body, param in (({"steps": 4}, "steps"), ({"guidance_scale": 5.0}, "strategy.guidance"),
                            ({"strategy": {"sampler": {"name": "dpmpp_2m"}}}, "strategy.sampler")):
            response = client.post("/v1/images/generations",
                                   json={"model": "shapes_fdistill", "prompt": "a red circle", **body})
            assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
        ok = client.post("/v1/images/generations", json={"model": "shapes_fdistill", "prompt": "a red circle"})
        assert ok.status_code == 200, ok.text



def test_a_server_with_compiled_streams_serves_a_student() -> None:
    """The stream warm-up builds the default img2img session's graphs, which a student cannot run: a server
    serving a student (with stream compilation on, as it is by default) starts, warms the student at 1 step
    and is ready (it used to refuse its own warm-up)."""
    settings = make_settings(None, served_models=["shapes_fdistill"], stream_acceleration="compile")
    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 200
        ok = client.post("/v1/images/generations", json={"model": "shapes_fdistill", "prompt": "a red circle"})
        assert ok.status_code == 200, ok.text

def test_shipped_weights_fit_the_budget() -> None:
    total = sum(p.stat().st_size for p in BUILTIN.rglob("*") if p.is_file())
    assert total < BUDGET_BYTES, f"{total / 2**20:.1f} MB of shipped models"


def test_a_txt2img_stream_session_of_the_student_is_one_nfe_a_frame_and_follows_the_prompt() -> None:
    from accel_diffusion.eval.shapes_judge import ShapesJudge
    from accel_diffusion.stream import StreamSession

    loaded = ModelRegistry.default().get("shapes_fdistill")
    session = StreamSession(loaded, "a red circle on a blue background", t_index_list=[0], guidance="none",
                            mode="txt2img", seed=0)
    outputs = [session() for _ in range(3)]
    assert all(o is not None and o.shape == (32, 32, 3) for o in outputs)  # one slot: no warm-up
    assert session.state.nfe == 3 and session.state.unet_calls == 3
    predicted = ShapesJudge.load().predict(np.stack(outputs))
    assert sum(p == ("circle", "red", "blue") for p in predicted) >= 2, predicted

