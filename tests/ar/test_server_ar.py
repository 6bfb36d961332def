"""shapes_mar-style models served by the real FastAPI app (TestClient): the OpenAI route and jobs generate from an
AR model by name, jobs report the head steps per AR iteration and progress per iteration, bad DiSA requests are
400s naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings, wait_finished
from tiny_mar import tiny_mar_dir  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def client(tiny_mar_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    models = tmp_path_factory.mktemp("models") / "models.toml"
    models.write_text(f'[models.tiny_mar]\nsource = "local"\npath = "{tiny_mar_dir}"\ndefault_steps = 3\n'
                      'default_strategy = { sampler = { name = "ddpm" }, schedule = { name = "spacing" }, '
                      'guidance = { name = "cfg", scale = 3.0 } }\n')
    with TestClient(create_app(make_settings(models, served_models=["tiny_mar"]))) as test_client:
        yield test_client


def test_job_reports_head_steps_and_progress_per_iteration(client: TestClient) -> None:
    body = {"model": "tiny_mar", "prompt": PROMPT, "seed": 1,
            "strategy": {"schedule": {"name": "disa", "upper": 7, "lower": 2, "kind": "two_stage"}}}
    job = wait_finished(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded", job
    ar = job["result"]["ar"]
    assert ar["head_steps"] == [7, 7, 7, 2, 2, 2] and ar["head_steps_total"] == 27  # switch at ceil(5/2) = 3
    assert job["progress"]["step"] == job["progress"]["total"] == 6


def test_openai_route_generates_from_the_ar_model(client: TestClient) -> None:
    response = client.post("/v1/images/generations", json={"model": "tiny_mar", "prompt": PROMPT, "n": 2, "seed": 4,
                                                            "size": "32x32"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny_mar"]


@pytest.mark.parametrize(("strategy", "field"), [
    ({"schedule": {"name": "disa", "upper": 5, "lower": 9}}, "strategy.schedule.lower"),
    ({"schedule": {"name": "disa", "upper": 0}}, "strategy.schedule.upper"),
    ({"schedule": {"name": "karras"}}, "strategy.schedule.name"),
])
def test_bad_disa_requests_are_400s_naming_the_field(client: TestClient, strategy: dict, field: str) -> None:
    for path in ("/v1/jobs", "/v1/images/generations"):
        response = client.post(path, json={"model": "tiny_mar", "prompt": PROMPT, "strategy": strategy})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field
