"""The HTTP API in-process: the OpenAI images route (also through the openai package), jobs, SSE,
cancellation, errors, auth, health and metrics."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accel_diffusion.server import create_app
from accel_diffusion.server.schemas import ImagesResponse
from fastapi.testclient import TestClient
from openai import OpenAI
from server_clients import decode, make_settings, sse_events, wait_finished, wait_status

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"


def direct_images(models_file: Path, **fields: object) -> np.ndarray:
    """The same request through the engine, without the server (batch-invariant, as the server)."""
    result = Engine(ModelRegistry.from_file(models_file)).generate(GenerationRequest.create(model="tiny", **fields),
                                                                   batch_invariant=True)
    return result.to_uint8()


def test_openai_route_returns_the_engine_images(client: TestClient, tiny_models_file: Path) -> None:
    response = client.post("/v1/images/generations", json={
        "prompt": PROMPT, "n": 2, "size": "32x32", "seed": 5, "num_inference_steps": 3, "guidance_scale": 4.0,
    }, headers={"X-Request-Id": "abc"})
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == "abc"
    body = response.json()
    ImagesResponse.model_validate(body)  # the documented response model
    assert body["seeds"] == [5, 6] and [d["seed"] for d in body["data"]] == [5, 6]
    assert body["usage"]["images"] == 2 and body["usage"]["nfe_per_image"] == 3 * 2
    images = np.stack([decode(d["b64_json"]) for d in body["data"]])
    expected = direct_images(tiny_models_file, prompt=PROMPT, n=2, seed=5, steps=3,
                             strategy={"guidance": {"name": "cfg", "scale": 4.0}})
    assert images.shape == (2, 32, 32, 3) and np.array_equal(images, expected)


@pytest.mark.parametrize(("output_format", "magic"), [("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_output_formats(client: TestClient, output_format: str, magic: bytes) -> None:
    import base64

    body = client.post("/v1/images/generations", json={
        "prompt": PROMPT, "seed": 1, "num_inference_steps": 2, "output_format": output_format,
        "output_compression": 80}).json()
    assert base64.b64decode(body["data"][0]["b64_json"]).startswith(magic)


def test_the_openai_package_works_against_the_server(client: TestClient) -> None:
    openai_client = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    result = openai_client.images.generate(model="tiny", prompt=PROMPT, n=2, size="32x32",
                                           extra_body={"seed": 11, "num_inference_steps": 2})
    assert len(result.data) == 2 and decode(result.data[0].b64_json).shape == (32, 32, 3)
    assert result.created > 0


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": "a", "size": "33x32"}, 400, "size"),  # the field sent, not the width it became
    ({"prompt": "a", "size": "big"}, 400, "size"),
    ({"prompt": "a", "model": "sd15"}, 404, "model"),
    ({"prompt": "a", "n": 99}, 400, "n"),
    ({"prompt": "a", "num_inference_steps": 5000}, 400, "num_inference_steps"),
    ({"prompt": "a", "steps": 5000}, 400, "steps"),
    ({"prompt": "a", "size": "32x32", "width": 32}, 400, "size"),  # one thing, two names
    ({"prompt": "a", "steps": 2, "num_inference_steps": 2}, 400, "num_inference_steps"),
    ({"prompt": "a", "strategy": {"sampler": {"name": "nope"}}}, 400, "strategy.sampler.name"),
    ({"prompt": "a", "strategy": {"sampler": {"name": "ghvb", "order": 9}}}, 400, "strategy.sampler.order"),
    ({"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ({"prompt": "a", "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": "a", "colour": "red"}, 400, "colour"),
    ({"prompt": "a", "vae": "taesd"}, 400, "vae"),
    ({"prompt": "a", "vae": "tiny"}, 400, "vae"),  # the tiny test model declares no tiny autoencoder
    ({"n": 1}, 400, "prompt"),
    ({"prompt": "a", "size": "²x²"}, 400, "size"),  # str.isdigit() digits that int() refuses
    ({"prompt": "a", "size": "1" * 5000 + "x32"}, 400, "size"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, 400, "seed"),  # image 2's seed would overflow
    # refused when submitted, not accepted and failed later: RCFG self-negative needs an init image
    ({"prompt": "a", "strategy": {"guidance": {"name": "rcfg", "variant": "self"}}}, 400, "strategy.guidance.variant"),
])
def test_invalid_input_is_a_4xx_naming_the_field(client: TestClient, body: dict, status: int, param: str) -> None:
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"] and "Traceback" not in response.text
    assert set(error) == {"type", "code", "message", "param"}


def test_every_route_takes_both_spellings_and_makes_the_same_images(client: TestClient) -> None:
    """One vocabulary: the engine's names (steps, width/height, n) and the OpenAI/diffusers ones
    (num_inference_steps, size, num_images_per_prompt) on the OpenAI images route and on /v1/jobs."""
    canonical = {"prompt": PROMPT, "seed": 3, "steps": 2, "width": 24, "height": 32, "n": 2}
    aliased = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 2, "size": "24x32", "num_images_per_prompt": 2}
    images = {}
    for route in ("/v1/images/generations", "/v1/jobs"):
        for spelling, body in (("canonical", canonical), ("aliased", aliased)):
            response = client.post(route, json=body)
            assert response.status_code in (200, 202), response.text
            if route == "/v1/jobs":
                job = wait_finished(client, response.json()["id"])
                assert job["status"] == "succeeded", job
                assert (job["result"]["width"], job["result"]["height"], job["result"]["steps"]) == (24, 32, 2)
                data = job["result"]["images"]
            else:
                data = response.json()["data"]
            images[route, spelling] = np.stack([decode(d["b64_json"]) for d in data])
    reference = images["/v1/images/generations", "canonical"]
    assert reference.shape == (2, 32, 24, 3) and len(images) == 4
    assert all(np.array_equal(reference, other) for other in images.values())


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/jobs", "/v1/images/edits"])
@pytest.mark.parametrize(("field", "meant"), [("stpes", "steps"), ("num_inference_step", "num_inference_steps"),
                                              ("Size", "size"), ("negative", "negative_prompt")])
def test_an_unknown_field_names_the_field_that_was_meant(client: TestClient, route: str, field: str,
                                                         meant: str) -> None:
    import base64

    from server_clients import init_png

    body = {"prompt": PROMPT, field: 2}
    if route == "/v1/images/edits":
        body["image"] = base64.b64encode(init_png()).decode()
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: unknown field; did you mean `{meant}`?")


def test_a_bad_alias_on_jobs_and_edits_names_the_alias(client: TestClient) -> None:
    import base64

    from server_clients import init_png

    image = base64.b64encode(init_png()).decode()
    for route, extra in (("/v1/jobs", {}), ("/v1/images/edits", {"image": image})):
        for body, param, fragment in (({"size": "33x32"}, "size", "size: width must be a multiple of 8"),
                                      ({"num_inference_steps": 500}, "num_inference_steps", "between 1 and 150"),
                                      ({"size": "32x32", "height": 32}, "size", "not both")):
            response = client.post(route, json={"prompt": PROMPT, **extra, **body})
            assert response.status_code == 400, (route, body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and fragment in error["message"], (route, body, error)


def test_models_report_the_default_size_the_engine_uses(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """A registry entry without default_width/height gets the UNet's native size (sample_size x the VAE
    factor), as the engine; a model that makes no images (gmm) has none."""
    models = tmp_path / "models.toml"
    models.write_text(f'[models.tiny]\nsource = "local"\npath = "{tiny_sd_dir}"\ndefault_steps = 4\n'
                      'default_strategy = { sampler = { name = "ddim" }, schedule = { name = "spacing" }, '
                      'guidance = { name = "cfg", scale = 5.0 } }\n'
                      '[models.gmm]\nsource = "builtin"\npath = "gmm"\ndefault_steps = 20\n'
                      'default_strategy = { sampler = { name = "ddim" }, schedule = { name = "spacing" }, '
                      'guidance = { name = "none" } }\n')
    with TestClient(create_app(make_settings(models, served_models=["tiny", "gmm"]))) as client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert (listed["tiny"]["default_size"], listed["tiny"]["default_steps"]) == ("16x16", 4)
        assert (listed["gmm"]["default_size"], listed["gmm"]["default_steps"]) == (None, 20)
        job = wait_finished(client, client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 1}).json()["id"])
        assert (job["result"]["width"], job["result"]["height"]) == (16, 16)  # what was reported


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads alone raises RecursionError on it


@pytest.mark.parametrize(("path", "request_kwargs", "param"), [
    ("/v1/images/generations", {"content": '{"prompt": "a", "strategy": {"sampler": ' + DEEP + "}}"}, "body"),
    ("/v1/jobs", {"content": '{"prompt": "a", "strategy": ' + DEEP + "}"}, "body"),
    ("/v1/jobs", {"content": DEEP, "headers": {"Content-Type": "application/vnd.api+json"}}, "body"),
    ("/v1/images/edits", {"content": '{"prompt": "a", "image": "", "strategy": ' + DEEP + "}"}, "body"),
    ("/v1/images/edits", {"files": {"image": ("in.png", b"x", "image/png")},
                          "data": {"prompt": "a", "strategy": DEEP}}, "strategy"),
    ("/v1/jobs", {"content": '{"prompt": "a", "strategy": ' + "[" * 33 + "]" * 33 + "}"}, "body"),
], ids=["generations", "jobs", "jobs-json-suffix", "edits-json", "edits-multipart", "jobs-34-levels"])
def test_deeply_nested_json_is_a_400_naming_the_field_on_every_route(
        client: TestClient, path: str, request_kwargs: dict, param: str) -> None:
    """Every JSON a route reads goes through one bounded parser: a 400 that says what to change, never a
    500 (a RecursionError) or a bare "error parsing the body"."""
    if "content" in request_kwargs:
        request_kwargs = {"headers": {"Content-Type": "application/json"}} | request_kwargs
    response = client.post(path, **request_kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"{param}: nests arrays and objects ")
    assert error["message"].endswith(" levels deep; at most 32 allowed (send a flatter value)")


def test_job_lifecycle_and_sse_events(client: TestClient) -> None:
    created = client.post("/v1/jobs", json={"prompt": [PROMPT, "a cross"], "seed": 3, "steps": 4,
                                            "strategy": {"sampler": {"name": "deis"}}})
    assert created.status_code == 202 and created.headers["Location"] == f"/v1/jobs/{created.json()['id']}"
    job_id = created.json()["id"]
    job = wait_finished(client, job_id)
    assert job["status"] == "succeeded" and job["progress"] == {"step": 4, "total": 4, "fraction": 1.0}
    assert [im["seed"] for im in job["result"]["images"]] == [3, 4]
    assert job["result"]["nfe"] == 8  # per image: 4 steps x (cond + uncond)
    assert job["request"]["strategy"]["sampler"]["name"] == "deis"
    events = sse_events(client.get(f"/v1/jobs/{job_id}/events").text)
    assert [e["event"] for e in events] == (["job.queued", "job.started"] + ["job.progress"] * 4
                                            + ["job.completed"])
    assert [e["id"] for e in events] == list(range(1, 8))
    assert [e["data"]["step"] for e in events if e["event"] == "job.progress"] == [1, 2, 3, 4]
    resumed = sse_events(client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "5"}).text)
    assert [e["id"] for e in resumed] == [6, 7]
    for past_the_end in ("7", "99"):  # a finished job's stream ends instead of sending heartbeats forever
        response = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": past_the_end})
        assert response.status_code == 200 and sse_events(response.text) == []
    huge = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "9" * 5000})
    assert huge.status_code == 200 and len(sse_events(huge.text)) == 7  # not a number we take: from the start
    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()["data"]
    assert job_id in [j["id"] for j in listed] and all(j["result"] is None for j in listed)


def test_previews_arrive_as_events_and_a_job_keeps_the_latest_ones_images(client: TestClient) -> None:
    long = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 0, "steps": 150, "preview_every": 2}).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{long}").json()["progress"]["step"] < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    client.post(f"/v1/jobs/{long}/cancel")
    wait_finished(client, long)
    previews = [e for e in sse_events(client.get(f"/v1/jobs/{long}/events").text) if e["event"] == "job.preview"]
    assert [p["data"]["step"] for p in previews][:3] == [2, 4, 6]
    assert decode(previews[-1]["data"]["b64_json"][0]).shape == (32, 32, 3)  # a cancelled job keeps its last
    assert all(p["data"].get("superseded") and "b64_json" not in p["data"] for p in previews[:-1])
    # a finished job's result supersedes its previews: it does not keep their images beside the result
    done = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 0, "steps": 7, "preview_every": 2}).json()["id"]
    wait_finished(client, done)
    previews = [e for e in sse_events(client.get(f"/v1/jobs/{done}/events").text) if e["event"] == "job.preview"]
    assert [p["data"] for p in previews] == [{"step": step, "superseded": True} for step in (2, 4, 6)]


def test_cancel_queued_and_running_jobs(client: TestClient) -> None:
    long = {"prompt": PROMPT, "n": 4, "seed": 0, "steps": 150}
    running = client.post("/v1/jobs", json=long).json()["id"]
    queued = client.post("/v1/jobs", json=long).json()["id"]
    wait_status(client, running, "running")
    assert client.get(f"/v1/jobs/{queued}").json()["queue_position"] == 0
    cancelled = client.post(f"/v1/jobs/{queued}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    client.post(f"/v1/jobs/{running}/cancel")
    job = wait_finished(client, running)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 150 and job["result"] is None
    events = sse_events(client.get(f"/v1/jobs/{running}/events").text)
    assert events[-1]["event"] == "job.cancelled"
    # the worker is free again
    after = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 2, "num_inference_steps": 2})
    assert after.status_code == 200


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/v1/jobs/job_nope")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_starlettes_own_errors_are_openai_shaped(client: TestClient) -> None:
    for response, status, kind in ((client.get("/v1/nope"), 404, "not_found"),
                                   (client.delete("/v1/jobs"), 405, "method_not_allowed")):
        assert response.status_code == status and set(response.json()["error"]) == {"type", "code", "message", "param"}
        assert response.json()["error"]["type"] == kind
    assert client.delete("/v1/jobs").headers["allow"]  # 405 keeps its Allow header


def test_a_synchronous_calls_images_are_not_kept_after_delivery(client: TestClient) -> None:
    body = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 4, "num_inference_steps": 2}).json()
    assert body["data"][0]["b64_json"]
    job = client.get(f"/v1/jobs/{body['id']}").json()
    assert job["status"] == "succeeded" and job["result"]["images_released"]
    assert job["result"]["images"] == [{"seed": 4, "b64_json": None, "prompt": PROMPT}]


def test_concurrent_clients_get_their_own_images(client: TestClient, tiny_models_file: Path) -> None:
    results: dict[int, np.ndarray] = {}

    def call(seed: int) -> None:
        body = client.post("/v1/images/generations", json={
            "prompt": f"a {['red', 'green', 'blue', 'white'][seed % 4]} cross", "seed": seed,
            "num_inference_steps": 2}).json()
        results[seed] = decode(body["data"][0]["b64_json"])

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(8):
        expected = direct_images(tiny_models_file, prompt=f"a {['red', 'green', 'blue', 'white'][seed % 4]} cross",
                                 seed=seed, steps=2)
        assert np.array_equal(results[seed], expected[0]), seed


def test_models_strategies_health_version_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["default_steps"] == 4
    components = client.get("/v1/strategies").json()["components"]
    ghvb = next(c for c in components["sampler"] if c["name"] == "ghvb")
    assert ghvb["config_schema"]["properties"]["order"]["default"] == 3.8
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").json()["status"] == "ready"
    assert client.get("/version").json()["accel_diffusion"] == "0.1.0"
    metrics = client.get("/metrics").text
    for name in ("accel_diffusion_queue_depth", "accel_diffusion_images_total", "accel_diffusion_nfe_total",
                 "accel_diffusion_step_seconds_bucket", "accel_diffusion_request_seconds_bucket"):
        assert name in metrics
    schema = client.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/jobs", "/v1/jobs/{job_id}/events"} <= set(schema["paths"])



@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_nothing_from_the_network(client: TestClient, page: str) -> None:
    """Swagger UI and ReDoc come with the server (a machine offline still gets working docs)."""
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", html) == []  # no absolute or protocol-relative URL
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert len(assets) >= 2  # the page's script and its style sheet or icon
    for asset in assets:
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 1000, asset
    assert "/openapi.json" in html and client.get("/openapi.json").status_code == 200

def test_queue_full_is_429_with_retry_after(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file, queue_max=1))) as client:
        long = {"prompt": PROMPT, "n": 4, "seed": 0, "steps": 150}
        first = client.post("/v1/jobs", json=long).json()["id"]
        wait_status(client, first, "running")
        second = client.post("/v1/jobs", json=long)
        third = client.post("/v1/jobs", json=long)
        assert second.status_code == 202 and third.status_code == 429
        assert int(third.headers["Retry-After"]) >= 1 and third.json()["error"]["type"] == "queue_full"
        for job_id in (first, second.json()["id"]):
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_api_keys(tiny_models_file: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    settings = make_settings(tiny_models_file, api_keys=["secret"], api_keys_file=key_file)
    with TestClient(create_app(settings)) as client:
        denied = client.get("/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "unauthorized"
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer from-file"}).status_code == 200
        assert client.get("/health/ready").status_code == 200 and client.get("/metrics").status_code == 200


def test_each_api_key_sees_and_cancels_only_its_own_jobs(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, api_keys=["alice-key", "bob-key"])
    alice, bob = ({"Authorization": f"Bearer {k}"} for k in ("alice-key", "bob-key"))
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 0, "steps": 2}, headers=alice).json()["id"]
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
            assert client.get(path, headers=bob).status_code == 404  # answered like a job that does not exist
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bob).status_code == 404
        assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=bob).json()["data"]]
        assert job_id in [j["id"] for j in client.get("/v1/jobs", headers=alice).json()["data"]]
        assert wait_finished(client, job_id, headers=alice)["status"] == "succeeded"


def test_body_size_limit_and_cors_closed(tiny_models_file: Path) -> None:
    with TestClient(create_app(make_settings(tiny_models_file, max_body_bytes=2048))) as client:
        response = client.post("/v1/jobs", json={"prompt": "x" * 4000})
        assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
        body = ('{"prompt": "' + "x" * 4000 + '"}').encode()
        chunked = client.post("/v1/jobs", content=iter([body[:1000], body[1000:]]),  # no Content-Length
                              headers={"Content-Type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "request_too_large"
        preflight = client.options("/v1/jobs", headers={"Origin": "https://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers


def test_a_failing_job_fails_alone_and_the_worker_goes_on(tiny_models_file: Path, tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(tiny_models_file.read_text() + '\n[models.gmm]\nsource = "builtin"\npath = "gmm"\n')
    settings = make_settings(models, served_models=["tiny", "gmm"])
    with TestClient(create_app(settings)) as client:
        failed = client.post("/v1/jobs", json={"model": "gmm", "prompt": "x", "steps": 2}).json()["id"]
        after = client.post("/v1/jobs", json={"model": "tiny", "prompt": PROMPT, "seed": 0, "steps": 2}).json()["id"]
        job = wait_finished(client, failed)
        assert job["status"] == "failed" and job["error"]["param"] == "model"
        assert job["error"]["type"] == "invalid_request_error" and "text-to-image" in job["error"]["message"]
        assert wait_finished(client, after)["status"] == "succeeded"
        sync = client.post("/v1/images/generations", json={"model": "gmm", "prompt": "x"})
        assert sync.status_code == 400 and sync.json()["error"]["param"] == "model"
        assert 'accel_diffusion_errors_total{type="invalid_request_error"}' in client.get("/metrics").text


def test_cors_allowlist(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, cors_origins=["https://app.example"])
    with TestClient(create_app(settings)) as client:
        allowed = client.options("/v1/jobs", headers={"Origin": "https://app.example",
                                                      "Access-Control-Request-Method": "POST"})
        other = client.options("/v1/jobs", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "POST"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-origin" not in other.headers


def test_get_job_long_polls_until_the_job_ends(client: TestClient) -> None:
    job_id = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 4, "steps": 3}).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()["status"] == "succeeded"
    slow = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 4, "steps": 150}).json()["id"]
    begin = time.monotonic()
    assert client.get(f"/v1/jobs/{slow}", params={"wait": 0.3}).json()["status"] in ("queued", "running")
    assert 0.3 <= time.monotonic() - begin < 5
    client.post(f"/v1/jobs/{slow}/cancel")
    assert client.get(f"/v1/jobs/{slow}", params={"wait": 30}).json()["status"] == "cancelled"
    response = client.get(f"/v1/jobs/{slow}", params={"wait": 61})
    assert response.status_code == 400 and response.json()["error"]["param"] == "query.wait"


@pytest.mark.parametrize(("raised", "status", "kind"), [
    (RuntimeError("a kernel blew up"), 500, "internal_error"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 503, "gpu_oom"),
])
def test_an_exception_inside_the_model_fails_that_job_typed_and_the_next_job_runs(
        tiny_models_file: Path, raised: Exception, status: int, kind: str) -> None:
    with TestClient(create_app(make_settings(tiny_models_file))) as client:
        unet = client.app.state.server.registry.get("tiny").pipeline.unet
        calls = {"n": 0}

        def fail_on_third_call(module: object, args: object) -> None:
            calls["n"] += 1
            if calls["n"] == 3:  # inside a running job, at its third denoising step
                raise raised

        handle = unet.register_forward_pre_hook(fail_on_third_call)
        try:
            failed = client.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 4})
            after = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 1,
                                                                 "num_inference_steps": 2})
        finally:
            handle.remove()
        assert failed.status_code == status and failed.json()["error"]["type"] == kind
        assert "Traceback" not in failed.text and "blew up" not in failed.text  # no internals leak
        assert after.status_code == 200
        assert f'accel_diffusion_errors_total{{type="{kind}"}} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/jobs", b'{"prompt": "a red \\ud800 circle", "seed": 0, "steps": 2}', "prompt"),
    ("/v1/jobs", b'{"prompt": ["a cross", "\\udfff"], "steps": 2}', "prompt.1"),
    ("/v1/jobs", b'{"prompt": "a cross", "negative_prompt": "\\udc80", "steps": 2}', "negative_prompt"),
    ("/v1/jobs", b'{"prompt": "a cross", "strategy": {"sampler": {"name": "ddim", "eta\\ud800": 0}}}',
     "strategy.sampler.eta\ufffd"),
    ("/v1/images/generations", b'{"prompt": "a red \\ud800 circle", "num_inference_steps": 2}', "prompt"),
    ("/v1/images/generations", b'{"prompt": "a cross", "model": "tiny\\ud800"}', "model"),
])
def test_text_that_cannot_be_encoded_is_a_400_naming_the_field_and_nothing_is_queued(
        client: TestClient, route: str, body: bytes, param: str) -> None:
    before = len(client.get("/v1/jobs").json()["data"])
    response = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200 and len(listed.json()["data"]) == before


def test_a_job_kept_with_text_that_cannot_be_encoded_does_not_break_the_job_routes(client: TestClient) -> None:
    from accel_diffusion.server.jobs import Job, JobStatus

    # as if accepted before the edge refused such text: GenerationRequest.model_construct skips validation
    job = Job(request=GenerationRequest.model_construct(**{**GenerationRequest.create(prompt="x").__dict__,
                                                           "prompt": "a red \ud800 circle"}))
    job.finish(JobStatus.FAILED, error={"type": "internal_error", "code": "internal_error", "param": None,
                                        "message": "bad \udfff"})
    client.app.state.server.jobs.add(job)
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200
    assert next(j for j in listed.json()["data"] if j["id"] == job.id)["request"]["prompt"] == "a red \ufffd circle"
    one = client.get(f"/v1/jobs/{job.id}")
    assert one.status_code == 200 and one.json()["error"]["message"] == "bad \ufffd"
    assert client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 0, "steps": 2}).status_code == 202


def test_limits_apply_to_the_request_with_the_models_defaults_filled_in(tiny_models_file: Path,
                                                                        tmp_path: Path) -> None:
    models = tmp_path / "models.toml"  # the tiny model with defaults above the server's limits
    models.write_text(tiny_models_file.read_text().replace("default_steps = 4", "default_steps = 25")
                      .replace("default_width = 32", "default_width = 64")
                      .replace("default_height = 32", "default_height = 64").replace("ddim", "dpmpp_2m"))
    settings = make_settings(models, max_steps=8, max_width=48, max_height=64, max_pixels=48 * 48)
    ten_steps = {"name": "timesteps", "timesteps": list(range(900, -1, -100))}
    refused = [
        ("/v1/jobs", {"prompt": "a", "width": 32}, "steps", "is 25 (the model's default, as the request gave none)"),
        ("/v1/images/generations", {"prompt": "a", "size": "32x32"}, "steps", "at most 8 allowed: send steps <= 8"),
        ("/v1/jobs", {"prompt": "a", "steps": 4}, "width", "is 64 (the model's default, as the request gave none)"),
        ("/v1/images/generations", {"prompt": "a", "size": "auto", "num_inference_steps": 4}, "width", "at most 48"),
        ("/v1/jobs", {"prompt": "a", "steps": 4, "width": 40}, "width", "40x64 is 2560 pixels (the model's default"),
        ("/v1/jobs", {"prompt": "a", "width": 32, "height": 32, "strategy": {"schedule": ten_steps}},
         "strategy.schedule", "runs 10 steps; at most 8"),
    ]
    with TestClient(create_app(settings)) as client:
        for route, body, param, fragment in refused:
            response = client.post(route, json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and fragment in error["message"], (body, error)
        assert client.get("/v1/jobs").json()["data"] == []  # nothing was queued
        job = client.post("/v1/jobs", json={"prompt": "a", "steps": 2, "width": 32, "seed": 0}).json()  # 32x64
        assert wait_finished(client, job["id"])["result"]["height"] == 64


def test_a_strategy_is_checked_once_per_model_strategy_steps_and_mode(tiny_models_file: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server keeps ``check_request``'s verdicts (``StrategyChecks``): requests that differ only in
    prompt, seed or n are not checked again; another strategy, step count or mode is; a refusal is refused
    (and checked) every time."""
    import base64

    from accel_diffusion.server import app as app_module
    from server_clients import init_png

    calls: list[dict] = []
    check_request = app_module.check_request

    def counted(spec: object, request: GenerationRequest) -> object:
        calls.append(request.strategy.model_dump(exclude_none=True))
        return check_request(spec, request)

    monkeypatch.setattr(app_module, "check_request", counted)
    with TestClient(create_app(make_settings(tiny_models_file))) as client:
        def post(**body: object) -> object:
            return client.post("/v1/images/generations", json={"prompt": PROMPT, "num_inference_steps": 2, **body})

        calls.clear()
        assert post(seed=1).status_code == 200
        assert post(prompt="a blue square", seed=2, n=2).status_code == 200
        assert len(calls) == 1
        assert post(guidance_scale=3.0).status_code == 200  # another strategy
        assert post(num_inference_steps=3).status_code == 200  # another step count
        assert len(calls) == 3 and calls[1]["guidance"]["scale"] == 3.0
        for _ in range(2):
            response = post(strategy={"guidance": {"name": "rcfg", "variant": "self"}})
            assert response.status_code == 400 and response.json()["error"]["param"] == "strategy.guidance.variant"
        assert len(calls) == 5
        edit = client.post("/v1/images/edits", json={"image": base64.b64encode(init_png()).decode(), "prompt": PROMPT,
                                                     "num_inference_steps": 2, "seed": 1})
        assert edit.status_code == 200 and len(calls) == 6  # img2img: another mode
        assert post(seed=9).status_code == 200 and len(calls) == 6


def test_strategy_checks_keep_the_newest_entries_and_never_a_runtime(tiny_models_file: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_diffusion.server import app as app_module

    from accel_diffusion.errors import IncompatibleStrategyError

    calls: list[GenerationRequest] = []
    check_request = app_module.check_request
    monkeypatch.setattr(app_module, "check_request", lambda spec, request: calls.append(request) or check_request(
        spec, request))
    spec = ModelRegistry.from_file(tiny_models_file).spec("tiny")
    checks = app_module.StrategyChecks(max_entries=2)

    def request(scale: float, **strategy: object) -> GenerationRequest:
        return GenerationRequest.create(model="tiny", prompt="a", strategy={"guidance": {"name": "cfg", "scale": scale},
                                                                            **strategy})

    first = checks.prepared(spec, request(2.0))
    assert checks.prepared(spec, request(2.0)) is first and len(calls) == 1
    checks.prepared(spec, request(3.0))
    checks.prepared(spec, request(4.0))  # a third: the oldest (2.0) goes
    assert len(calls) == 3
    assert checks.prepared(spec, request(4.0)) is not None and len(calls) == 3
    assert checks.prepared(spec, request(2.0)) is not first and len(calls) == 4
    for _ in range(2):  # a patch-parallel runtime depends on the process group: checked every time
        with pytest.raises(IncompatibleStrategyError, match="patch_parallel"):
            checks.prepared(spec, request(2.0, runtime={"name": "patch_parallel"}))
    assert len(calls) == 6
