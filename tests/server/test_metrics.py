"""Prometheus metrics: every job and every error response is counted once (by type), batched or not."""

from __future__ import annotations

from pathlib import Path

from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_clients import make_settings, wait_finished, wait_status

PROMPT = "a red circle on a blue background"


def samples(client: TestClient, name: str) -> dict[str, float]:
    """``name``'s samples from /metrics, keyed by sample name plus its labels' values."""
    found = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name.startswith(name) and "le" not in sample.labels:
                found[sample.name + "".join(f"[{v}]" for v in sample.labels.values())] = sample.value
    return found


def test_a_batch_counts_each_of_its_jobs(tiny_models_file: Path) -> None:
    # the batch closes when its third job arrives: a long wait costs nothing, and a loaded machine that takes
    # longer than a short one between the three requests (CI under load once did) still batches them
    settings = make_settings(tiny_models_file, max_batch_size=3, max_batch_wait_ms=30_000)
    with TestClient(create_app(settings)) as client:
        ids = [client.post("/v1/jobs", json={"prompt": PROMPT, "seed": seed, "steps": 2}).json()["id"]
               for seed in range(3)]
        assert [wait_finished(client, i)["result"]["batch_size_used"] for i in ids] == [3, 3, 3]
        assert samples(client, "accel_diffusion_job_seconds_count") == {"accel_diffusion_job_seconds_count": 3.0}
        assert samples(client, "accel_diffusion_batch_size_count") == {"accel_diffusion_batch_size_count": 1.0}
        assert samples(client, "accel_diffusion_images_total") == {"accel_diffusion_images_total": 3.0}


def test_every_error_response_is_counted_once_by_type(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, api_keys=["key"], max_body_bytes=2048, queue_max=1)
    auth = {"Authorization": "Bearer key"}
    app = create_app(settings)

    @app.get("/v1/broken")
    async def broken() -> None:  # a bug in a route: a 500
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False, headers=auth) as client:
        statuses = [
            client.post("/v1/jobs", json={"prompt": "a", "colour": 1}).status_code,  # body validation
            client.post("/v1/images/generations", json={"prompt": "a", "size": "big"}).status_code,  # InvalidRequest
            client.post("/v1/jobs", json={"prompt": "x" * 4000}).status_code,  # Content-Length over the limit
            client.post("/v1/jobs", content=iter([b'{"prompt": "', b"x" * 4000, b'"}']),  # chunked
                        headers={"Content-Type": "application/json"}).status_code,
            client.get("/v1/jobs/job_nope").status_code,
            client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code,
            client.get("/v1/broken").status_code,
        ]
        long = {"prompt": PROMPT, "n": 4, "seed": 0, "steps": 150}
        running = client.post("/v1/jobs", json=long).json()["id"]
        wait_status(client, running, "running")
        queued = client.post("/v1/jobs", json=long).json()["id"]
        statuses.append(client.post("/v1/jobs", json=long).status_code)  # the queue is full
        client.app.state.server.draining = True
        statuses.append(client.post("/v1/jobs", json=long).status_code)
        client.app.state.server.draining = False
        for job_id in (running, queued):
            client.post(f"/v1/jobs/{job_id}/cancel")
        assert statuses == [400, 400, 413, 413, 404, 401, 500, 429, 503]
        assert samples(client, "accel_diffusion_errors_total") == {
            "accel_diffusion_errors_total[invalid_request_error]": 2.0,
            "accel_diffusion_errors_total[request_too_large]": 2.0,
            "accel_diffusion_errors_total[not_found]": 1.0,
            "accel_diffusion_errors_total[unauthorized]": 1.0,
            "accel_diffusion_errors_total[internal_error]": 1.0,
            "accel_diffusion_errors_total[queue_full]": 1.0,
            "accel_diffusion_errors_total[unavailable]": 1.0,
        }
