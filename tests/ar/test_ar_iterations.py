"""The ``ar_iterations`` request field on every path (engine, server jobs and OpenAI route, the Redis queue, the
SDK against a real uvicorn server, batch manifests local and through the server), checked against the analytic
plan and token schedule; out-of-range values and non-AR models are 400s naming the field. The SDK and the batch
manifests generate from the shipped ``shapes_mar`` by name."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.clients import AccelClient, InvalidRequest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import decode, make_settings, running_server, wait_finished
from tiny_mar import tiny_mar_dir  # noqa: F401  (the fixture)

from accel_diffusion.ar.masking import head_cost, tokens_per_iteration
from accel_diffusion.batch import LocalBackend, run_batch
from accel_diffusion.batch.runner import ServerBackend
from accel_diffusion.engine import Engine
from accel_diffusion.engine.engine import check_request
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle on a blue background"
BUILTIN_MODELS = Path(__file__).resolve().parents[2] / "accel_diffusion" / "models" / "models.toml"
DISA = {"schedule": {"name": "disa", "upper": 9, "lower": 2, "kind": "linear"}}


@pytest.fixture(scope="module")
def tiny_mar_models(tiny_mar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    models = tmp_path_factory.mktemp("models") / "models.toml"
    models.write_text(f'[models.tiny_mar]\nsource = "local"\npath = "{tiny_mar_dir}"\ndefault_steps = 3\n'
                      'default_strategy = { sampler = { name = "ddpm" }, schedule = { name = "spacing" }, '
                      'guidance = { name = "cfg", scale = 3.0 } }\n'
                      f'[models.shapes]\nsource = "builtin"\npath = "shapes"\ndefault_steps = 4\n')
    return models


@pytest.fixture(scope="module")
def engine(tiny_mar_models: Path) -> Engine:
    return Engine(ModelRegistry.from_file(tiny_mar_models))


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest.create(**{"model": "tiny_mar", "prompt": PROMPT, "seed": 3, **fields})


@pytest.mark.parametrize(("iterations", "plan"), [(3, [9, 5, 2]), (1, [9]), (16, None)])
def test_ar_iterations_sets_the_loop_and_the_annealed_plan(engine: Engine, iterations: int,
                                                           plan: list[int] | None) -> None:
    result = engine.generate(request(n=2, ar_iterations=iterations, strategy=DISA))
    ar = result.extra["ar"]
    if plan is None:  # one token per iteration: lower + floor((15 - k) / 15 * 7)
        plan = [2 + (15 - k) * 7 // 15 for k in range(16)]
    token_steps, total = head_cost(16, plan)
    assert ar["ar_iterations"] == iterations and ar["head_steps"] == plan and ar["head_steps_total"] == total
    assert ar["tokens_per_iteration"] == tokens_per_iteration(16, iterations)
    assert ar["head_nfe"] == 2 * total and ar["head_token_evals"] == 2 * token_steps  # CFG: two branches
    assert ar["transformer_nfe"] == 2 * iterations and result.nfe == 2 * total + 2 * iterations


def test_the_default_is_the_models_iterations(engine: Engine) -> None:
    assert engine.generate(request(steps=2)).extra["ar"]["head_steps"] == [2] * 6  # tiny_mar: 6 iterations


@pytest.mark.parametrize(("value", "words"), [(0, "greater than or equal to 1"), (17, "send 1 .. 16"),
                                              (-3, "greater than or equal to 1")])
def test_out_of_range_is_refused_naming_the_field(engine: Engine, value: int, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(ar_iterations=value))
    assert caught.value.field == "ar_iterations" and words in str(caught.value)


def test_a_diffusion_model_refuses_ar_iterations(engine: Engine) -> None:
    shapes = GenerationRequest.create(model="shapes", prompt=PROMPT, ar_iterations=4, steps=2)
    for call in (lambda: check_request(engine.models.spec("shapes"), shapes), lambda: engine.generate(shapes)):
        with pytest.raises(InvalidRequestError) as caught:
            call()
        assert caught.value.field == "ar_iterations" and "not autoregressive" in str(caught.value)


def test_server_jobs_and_openai_route(tiny_mar_models: Path) -> None:
    settings = make_settings(tiny_mar_models, served_models=["tiny_mar", "shapes"], warmup_steps=0)
    with TestClient(create_app(settings)) as client:
        body = {"model": "tiny_mar", "prompt": PROMPT, "seed": 1, "ar_iterations": 3, "strategy": DISA}
        job = wait_finished(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["ar"]["head_steps"] == [9, 5, 2] and job["progress"]["total"] == 3
        for path in ("/v1/jobs", "/v1/images/generations"):
            for model, value in (("tiny_mar", 17), ("tiny_mar", 0), ("shapes", 3)):
                response = client.post(path, json={"model": model, "prompt": PROMPT, "ar_iterations": value})
                assert response.status_code == 400, response.text
                assert response.json()["error"]["param"] == "ar_iterations"


def test_redis_queue_carries_ar_iterations_and_the_ar_result(tiny_mar_models: Path, redis_url: str) -> None:
    prefix = "ar" + uuid.uuid4().hex[:8]
    common = {"queue_backend": "redis", "redis_url": redis_url, "redis_prefix": prefix, "warmup_steps": 0,
              "served_models": ["tiny_mar"]}
    with ExitStack() as stack:
        api = stack.enter_context(TestClient(create_app(make_settings(tiny_mar_models, role="api", **common))))
        body = {"model": "tiny_mar", "prompt": PROMPT, "seed": 8, "ar_iterations": 3, "strategy": DISA}
        job_id = api.post("/v1/jobs", json=body).json()["id"]
        stack.enter_context(TestClient(create_app(make_settings(tiny_mar_models, role="worker", **common))))
        job = wait_finished(api, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        token_steps, total = head_cost(16, [9, 5, 2])
        ar = job["result"]["ar"]
        assert ar["head_steps"] == [9, 5, 2] and ar["head_steps_total"] == total == 16
        assert ar["tokens_per_iteration"] == tokens_per_iteration(16, 3) and ar["head_token_evals"] == 2 * token_steps
        assert job["progress"] == {**job["progress"], "step": 3, "total": 3}
        expected = Engine(ModelRegistry.from_file(tiny_mar_models)).generate(
            GenerationRequest.create(**body), batch_invariant=True).to_uint8()[0]
        np.testing.assert_array_equal(decode(job["result"]["images"][0]["b64_json"]), expected)


@pytest.fixture(scope="module")
def shipped_server() -> Iterator[str]:
    """A real uvicorn server on the built-in models file, serving the shipped shapes_mar."""
    app = create_app(make_settings(BUILTIN_MODELS, served_models=["shapes_mar"], warmup_steps=0))
    with running_server(app) as (_, _, base):
        yield base


SHIPPED = {"model": "shapes_mar", "prompt": PROMPT, "seed": 21, "ar_iterations": 4,
           "strategy": {"schedule": {"name": "disa", "upper": 6, "lower": 2, "kind": "cosine"}}}


def test_sdk_generates_from_shapes_mar_by_name(shipped_server: str) -> None:
    with AccelClient(shipped_server) as client:
        fields = {k: v for k, v in SHIPPED.items() if k != "prompt"}
        output = client.generate(PROMPT, **fields)
        assert output.raw["ar"]["head_steps"] == [6, 5, 3, 2] and output.raw["ar"]["ar_iterations"] == 4
        expected = Engine(ModelRegistry.from_file(BUILTIN_MODELS)).generate(
            GenerationRequest.create(**SHIPPED), batch_invariant=True).to_uint8()[0]
        np.testing.assert_array_equal(np.asarray(output.images[0]), expected)
        with pytest.raises(InvalidRequest) as caught:
            client.generate(PROMPT, model="shapes_mar", ar_iterations=65)
        assert caught.value.param == "ar_iterations"


def test_batch_manifest_generates_from_shapes_mar_locally_and_through_the_server(shipped_server: str,
                                                                                tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**SHIPPED, "id": "annealed"}) + "\n"
                        + json.dumps({"model": "shapes_mar", "prompt": PROMPT, "seed": 2, "steps": 3,
                                      "ar_iterations": 2, "id": "constant"}) + "\n")
    local = run_batch(manifest, tmp_path / "local", LocalBackend(BUILTIN_MODELS))
    backend = ServerBackend(shipped_server, concurrency=1)
    try:
        served = run_batch(manifest, tmp_path / "served", backend)
    finally:
        backend.close()
    assert local.ok and served.ok and local.images == served.images == 2
    for name, steps in (("annealed", [6, 5, 3, 2]), ("constant", [3, 3])):
        records = [json.loads(p.read_text()) for out in ("local", "served")
                   for p in sorted((tmp_path / out / "results").iterdir())]
        mine = [r for r in records if r["id"] == name]
        assert len(mine) == 2 and all(r["ar"]["head_steps"] == steps for r in mine)
        assert all(r["request"]["ar_iterations"] == len(steps) for r in mine)
    local_images = sorted(p.read_bytes() for p in (tmp_path / "local" / "images").iterdir())
    served_images = sorted(p.read_bytes() for p in (tmp_path / "served" / "images").iterdir())
    assert local_images == served_images


def test_cli_generates_from_shapes_mar_with_ar_iterations(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from accel_diffusion.cli import main

    args = ["--models", str(BUILTIN_MODELS), "generate", "-m", "shapes_mar", "-p", PROMPT, "--seed", "21",
            "--out", str(tmp_path), "--strategy", json.dumps(SHIPPED["strategy"])]
    result = CliRunner().invoke(main, [*args, "--ar-iterations", "4"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["ar"]["head_steps"] == [6, 5, 3, 2] and run["steps"] == 16
    refused = CliRunner().invoke(main, [*args, "--ar-iterations", "65"])
    assert refused.exit_code != 0 and "ar_iterations" in refused.output
