"""The shipped ``shapes_fdistill`` student asked for by name through the Python SDK (a real uvicorn server) and a
batch manifest: 1-step images equal to the engine's, NFE 1 and timings reported as for any model, and the
requests it cannot serve (4 steps, CFG) refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.clients import AccelClient, InvalidRequest
from accel_diffusion.server import create_app
from PIL import Image
from server_clients import make_settings, running_server

from accel_diffusion.batch import LocalBackend, run_batch
from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")

STUDENT = "shapes_fdistill"
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ModelRegistry.default())


def test_sdk_gets_one_step_images_of_the_student_by_name(engine: Engine) -> None:
    # the server's default warm-up (2 steps) would be refused by the student: it warms up at its own 1 step
    app = create_app(make_settings(None, served_models=[STUDENT], warmup_steps=2))
    with running_server(app) as (_, _, base), AccelClient(base, timeout=60) as client:
        output = client.generate(PROMPTS[0], model=STUDENT, n=2, seed=3)
        with pytest.raises(InvalidRequest) as steps:
            client.generate(PROMPTS[0], model=STUDENT, steps=4)
        with pytest.raises(InvalidRequest) as guidance:
            client.generate(PROMPTS[0], model=STUDENT, guidance_scale=5.0)
    expected = engine.generate(GenerationRequest.create(model=STUDENT, prompt=PROMPTS[0], n=2, seed=3),
                               batch_invariant=True)
    images = np.stack([np.asarray(image) for image in output.images])
    assert images.shape == (2, 32, 32, 3) and np.array_equal(images, expected.to_uint8())
    assert (output.nfe, output.steps, output.seeds) == (1, 1, [3, 4])
    assert output.strategy["student"]["name"] == "one_step" and output.strategy["guidance"] == {"name": "none"}
    assert output.timings["wall"] >= output.timings["total"] > 0 and output.timings["denoise"] > 0
    assert steps.value.param == "steps" and guidance.value.param == "strategy.guidance"


def test_batch_manifest_lines_for_the_student_run_at_one_nfe(engine: Engine, tmp_path: Path) -> None:
    lines = [{"model": STUDENT, "prompt": PROMPTS[i], "seed": 10 + i, "id": f"s{i}"} for i in range(2)]
    lines += [{"model": STUDENT, "prompt": PROMPTS[0], "seed": 1, "steps": 4, "id": "four_steps"},
              {"model": STUDENT, "prompt": PROMPTS[0], "seed": 1, "guidance_scale": 5.0, "id": "cfg"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = run_batch(manifest, tmp_path / "out", LocalBackend(), progress=False)
    assert (report.generated, report.images, report.failed) == (2, 2, 2)
    assert sorted((e["line"], e["field"]) for e in report.errors) == [(3, "steps"), (4, "strategy.guidance")]
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["s0", "s1"]
    for i, record in enumerate(records):
        assert (record["nfe"], record["steps"]) == (1, 1) and record["strategy"]["student"]["name"] == "one_step"
        assert set(record["timings"]) >= {"denoise", "decode", "total", "wall"}
        expected = engine.generate(GenerationRequest.create(model=STUDENT, prompt=PROMPTS[i], seed=10 + i),
                                   batch_invariant=True).to_uint8()
        written = np.asarray(Image.open(tmp_path / "out" / record["files"][0]))
        assert np.array_equal(written[None], expected)
