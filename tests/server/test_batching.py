"""The worker batches compatible requests; every image keeps its own request's seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import decode, make_settings, wait_finished, wait_status

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPTS = ["a red circle on a blue background", "a white cross on a green background",
           "a yellow triangle on a black background", "a purple square on an orange background"]


def _run_four_jobs_as_one_batch(models_file: Path, batch_invariant: bool) -> list[dict]:
    settings = make_settings(models_file, max_batch_size=8, max_batch_wait_ms=400, batch_invariant=batch_invariant)
    with TestClient(create_app(settings)) as client:
        ids = [client.post("/v1/jobs", json={"prompt": p, "n": 2 if i == 1 else 1, "seed": 100 + 10 * i,
                                              "steps": 3}).json()["id"] for i, p in enumerate(PROMPTS)]
        other = client.post("/v1/jobs", json={"prompt": PROMPTS[0], "seed": 7, "steps": 2}).json()["id"]
        jobs = [wait_finished(client, job_id) for job_id in ids]
        assert all(job["status"] == "succeeded" for job in jobs)
        assert [job["result"]["batch_size_used"] for job in jobs] == [4, 4, 4, 4]
        assert wait_finished(client, other)["result"]["batch_size_used"] == 1  # other steps: not merged
    return jobs


def _alone(engine: Engine, i: int, batch_invariant: bool) -> np.ndarray:
    return engine.generate(GenerationRequest.create(model="tiny", prompt=PROMPTS[i], n=2 if i == 1 else 1,
                                                    seed=100 + 10 * i, steps=3),
                           batch_invariant=batch_invariant).to_uint8()


def test_compatible_jobs_run_as_one_batch_and_every_image_is_pixel_identical_to_it_alone(
        tiny_models_file: Path) -> None:
    jobs = _run_four_jobs_as_one_batch(tiny_models_file, batch_invariant=True)  # the default
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    for i, job in enumerate(jobs):
        alone = _alone(engine, i, batch_invariant=True)
        first = 100 + 10 * i
        assert [im["seed"] for im in job["result"]["images"]] == list(range(first, first + len(alone)))
        batched = np.stack([decode(im["b64_json"]) for im in job["result"]["images"]])
        assert np.array_equal(batched, alone)


def test_without_batch_invariance_images_agree_to_float_rounding(tiny_models_file: Path) -> None:
    jobs = _run_four_jobs_as_one_batch(tiny_models_file, batch_invariant=False)
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    for i, job in enumerate(jobs):
        batched = np.stack([decode(im["b64_json"]) for im in job["result"]["images"]])
        difference = np.abs(batched.astype(int) - _alone(engine, i, batch_invariant=False).astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() >= 0.999  # batch-size-dependent kernels


def test_cancelling_one_job_of_a_batch_keeps_the_others(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, max_batch_size=8, max_batch_wait_ms=400)
    with TestClient(create_app(settings)) as client:
        ids = [client.post("/v1/jobs", json={"prompt": p, "seed": 1, "steps": 150}).json()["id"]
               for p in PROMPTS[:3]]
        wait_status(client, ids[0], "running")
        assert client.post(f"/v1/jobs/{ids[1]}/cancel").json()["status"] == "cancelled"  # at once
        assert client.get(f"/v1/jobs/{ids[0]}").json()["status"] == "running"
        statuses = [wait_finished(client, job_id)["status"] for job_id in ids]
        assert statuses == ["succeeded", "cancelled", "succeeded"]


def test_a_request_that_fails_inside_a_batch_fails_alone_and_the_others_get_their_own_images(
        tiny_models_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tiny_models_file, max_batch_size=8, max_batch_wait_ms=400)
    with TestClient(create_app(settings)) as client:
        encoder = client.app.state.server.registry.get("tiny").prompt_encoder
        original, calls = encoder.conditioning, []

        def refuses_poison(prompts: list[str], *args: Any, **kwargs: Any) -> Any:  # the real encoder, but for one word
            calls.append(list(prompts))
            if any("poison" in p for p in prompts):
                raise RuntimeError("the text encoder refused a prompt")
            return original(prompts, *args, **kwargs)

        monkeypatch.setattr(encoder, "conditioning", refuses_poison)
        bodies = [{"prompt": PROMPTS[0], "seed": 100, "steps": 3}, {"prompt": "poison", "seed": 5, "steps": 3},
                  {"prompt": PROMPTS[1], "n": 2, "seed": 110, "steps": 3},
                  {"prompt": ["a cross", "poison too"], "seed": 6, "steps": 3}]
        ids = [client.post("/v1/jobs", json=body).json()["id"] for body in bodies]
        jobs = [wait_finished(client, job_id) for job_id in ids]
        metrics = client.get("/metrics").text
    assert len(calls[0]) == 6  # the four jobs ran as one batch first, then each alone
    assert [job["status"] for job in jobs] == ["succeeded", "failed", "succeeded", "failed"]
    assert {jobs[1]["error"]["type"], jobs[3]["error"]["type"]} == {"internal_error"}
    assert "refused" not in jobs[1]["error"]["message"]  # no internals leak
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    for i, job in zip((0, 1), (jobs[0], jobs[2]), strict=True):
        assert job["result"]["batch_size_used"] == 1
        assert [im["seed"] for im in job["result"]["images"]] == [100 + 10 * i + k for k in range(1 + i)]
        batched = np.stack([decode(im["b64_json"]) for im in job["result"]["images"]])
        assert np.array_equal(batched, _alone(engine, i, batch_invariant=True))  # bit-identical to a lone run
    assert 'accel_diffusion_errors_total{type="internal_error"} 2.0' in metrics  # per failed job
    assert "accel_diffusion_job_seconds_count 4.0" in metrics  # per job
