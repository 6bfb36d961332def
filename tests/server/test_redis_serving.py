"""Scale-out on a real redis-server: API replicas that load no model and worker processes share one queue.
Submit on one replica, follow, fetch and cancel on another; another key's job is 404 on every replica; a worker
killed with SIGKILL mid-job has its job reclaimed and completed once; Redis down -> 503 + Retry-After and
readiness failing, back without a restart, queued jobs kept (AOF)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from accel_diffusion.server import ServerSettings, create_app
from conftest import require_tool
from fastapi.testclient import TestClient
from redis_server import RedisServer, free_port
from server_clients import decode, make_settings
from starlette.websockets import WebSocketDisconnect

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

KEY1, KEY2 = "key-one-secret", "key-two-secret"
AUTH1, AUTH2 = {"Authorization": f"Bearer {KEY1}"}, {"Authorization": f"Bearer {KEY2}"}


def redis_settings(models_file: Path, url: str, prefix: str, role: str, **overrides: Any) -> ServerSettings:
    return make_settings(models_file, **{"queue_backend": "redis", "redis_url": url, "redis_prefix": prefix,
                                         "role": role, "api_keys": [KEY1, KEY2], **overrides})


def wait_job(client: TestClient, job_id: str, statuses: tuple[str, ...], headers: dict[str, str],
             timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise TimeoutError(f"{job_id} never reached {statuses}")


def sse(text: str) -> list[tuple[int, str]]:
    """(id, event) of each event of an SSE body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append((int(fields["id"]), fields["event"]))
    return events


def test_settings_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match="queue_backend = 'redis' needs redis_url"):
        ServerSettings(queue_backend="redis")
    with pytest.raises(ValueError, match="role = 'api' needs queue_backend = 'redis'"):
        ServerSettings(role="api")


def test_submit_on_one_replica_follow_fetch_and_list_on_another(tiny_models_file: Path, redis_url: str) -> None:
    prefix = "s" + uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        one, two = (stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix,
                                                                             "api")))) for _ in range(2))
        created = one.post("/v1/jobs", json={"model": "tiny", "prompt": "a red circle", "steps": 2, "seed": 5},
                           headers=AUTH1)
        assert created.status_code == 202 and created.headers["Location"] == f"/v1/jobs/{created.json()['id']}"
        job_id = created.json()["id"]
        assert two.get(f"/v1/jobs/{job_id}", headers=AUTH1).json()["status"] == "queued"  # no worker yet
        for client in (one, two):  # another key's job is missing on every replica, whatever the route
            assert client.get(f"/v1/jobs/{job_id}", headers=AUTH2).status_code == 404
            assert client.get(f"/v1/jobs/{job_id}/events", headers=AUTH2).status_code == 404
            assert client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH2).status_code == 404
            assert client.get("/v1/jobs", headers=AUTH2).json()["data"] == []
            assert client.get(f"/v1/jobs/{job_id}").status_code == 401
        metrics = [c.get("/metrics").text for c in (one, two)]
        for text in metrics:  # the same depth from every replica, read from Redis
            assert 'accel_diffusion_shared_queue_depth{model="tiny"} 1.0' in text
        worker = stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix,
                                                                          "worker", worker_name="w1"))))
        job = wait_job(two, job_id, ("succeeded", "failed"), AUTH1)
        assert job["status"] == "succeeded" and job["result"]["images"][0]["seed"] == 5
        expected = Engine(ModelRegistry.from_file(tiny_models_file)).generate(
            GenerationRequest.create(model="tiny", prompt="a red circle", steps=2, seed=5)).to_uint8()[0]
        np.testing.assert_array_equal(decode(job["result"]["images"][0]["b64_json"]), expected)
        events = sse(one.get(f"/v1/jobs/{job_id}/events", headers=AUTH1).text)
        assert events == [(1, "job.queued"), (2, "job.started"), (3, "job.progress"), (4, "job.progress"),
                          (5, "job.completed")]
        resumed = sse(two.get(f"/v1/jobs/{job_id}/events", headers={**AUTH1, "Last-Event-ID": "2"}).text)
        assert resumed == events[2:]  # resumed on the other replica: no gap, no duplicate
        assert [j["id"] for j in two.get("/v1/jobs", headers=AUTH1).json()["data"]] == [job_id]
        sync = two.post("/v1/images/generations", json={"model": "tiny", "prompt": "a red circle", "steps": 2,
                                                        "seed": 5}, headers=AUTH2)
        assert sync.status_code == 200
        np.testing.assert_array_equal(decode(sync.json()["data"][0]["b64_json"]), expected)
        kept = one.get(f"/v1/jobs/{sync.json()['id']}", headers=AUTH2).json()["result"]  # returned once: released
        assert kept["images_released"] is True and (kept["images"][0]["b64_json"], kept["images"][0]["seed"]) == (
            None, 5)
        assert 'accel_diffusion_shared_queue_depth{model="tiny"} 0.0' in one.get("/metrics").text
        for client in (one, two):  # API replicas never loaded a model; the worker did
            assert client.app.state.server.registry._loaded == {}
        assert list(worker.app.state.server.registry._loaded) == ["tiny"]
        assert worker.get("/health/ready").status_code == 200


def test_cancel_on_another_replica_queued_and_running(tiny_models_file: Path, redis_url: str) -> None:
    prefix = "c" + uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        one, two = (stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix,
                                                                             "api")))) for _ in range(2))
        body = {"model": "tiny", "prompt": "a", "steps": 150}
        running_id = one.post("/v1/jobs", json=body, headers=AUTH1).json()["id"]
        queued_id = one.post("/v1/jobs", json=body, headers=AUTH1).json()["id"]
        stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix, "worker"))))
        deadline = time.monotonic() + 60
        while two.get(f"/v1/jobs/{running_id}", headers=AUTH1).json()["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert two.post(f"/v1/jobs/{queued_id}/cancel", headers=AUTH1).json()["status"] == "cancelled"
        two.post(f"/v1/jobs/{running_id}/cancel", headers=AUTH1)
        running = wait_job(one, running_id, ("cancelled", "succeeded"), AUTH1)
        assert running["status"] == "cancelled" and running["progress"]["step"] < 150
        for job_id in (running_id, queued_id):
            events = [e for _, e in sse(one.get(f"/v1/jobs/{job_id}/events", headers=AUTH1).text)]
            assert events.count("job.cancelled") == 1 and events[-1] == "job.cancelled"
            assert "job.started" not in events or job_id == running_id


def test_the_queued_jobs_quota_holds_per_key_across_replicas(tiny_models_file: Path, redis_url: str) -> None:
    prefix = "q" + uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        one, two = (stack.enter_context(TestClient(create_app(redis_settings(
            tiny_models_file, redis_url, prefix, "api", key_max_queued_jobs=2)))) for _ in range(2))
        body = {"model": "tiny", "prompt": "a"}
        assert [c.post("/v1/jobs", json=body, headers=AUTH1).status_code for c in (one, two)] == [202, 202]
        refused = two.post("/v1/jobs", json=body, headers=AUTH1)
        assert refused.status_code == 429 and refused.json()["error"]["param"] == "key_max_queued_jobs"
        assert refused.headers["Retry-After"] == "2"
        assert one.post("/v1/jobs", json=body, headers=AUTH2).status_code == 202  # another key's quota


def test_an_api_replica_refuses_stream_sessions(tiny_models_file: Path, redis_url: str) -> None:
    settings = redis_settings(tiny_models_file, redis_url, "x", "api", api_keys=[])
    with TestClient(create_app(settings)) as client, client.websocket_connect("/v1/stream") as ws:
        ws.send_json({"type": "session.start", "prompt": "a"})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008 and "role = 'api'" in closed.value.reason


def test_redis_down_answers_503_and_recovers_with_the_queued_jobs(tiny_models_file: Path, tmp_path: Path) -> None:
    server = RedisServer(require_tool("redis-server"), tmp_path, persistent=True)
    server.start()
    try:
        settings = redis_settings(tiny_models_file, server.url, "d", "api")
        with TestClient(create_app(settings)) as client:
            job_id = client.post("/v1/jobs", json={"model": "tiny", "prompt": "a"}, headers=AUTH1).json()["id"]
            assert client.get("/health/ready").status_code == 200
            server.kill()
            begin = time.monotonic()
            down = client.get(f"/v1/jobs/{job_id}", headers=AUTH1)
            assert down.status_code == 503 and down.headers["Retry-After"] == "2"
            assert down.json()["error"]["type"] == "unavailable" and time.monotonic() - begin < 3
            submitted = client.post("/v1/jobs", json={"model": "tiny", "prompt": "a"}, headers=AUTH1)
            assert submitted.status_code == 503 and submitted.headers["Retry-After"] == "2"
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "2"
            server.start()  # same port and dir: the AOF is replayed; the app is not restarted
            assert client.get("/health/ready").status_code == 200
            job = client.get(f"/v1/jobs/{job_id}", headers=AUTH1)
            assert job.status_code == 200 and job.json()["status"] == "queued"
            assert 'accel_diffusion_shared_queue_depth{model="tiny"} 1.0' in client.get("/metrics").text
    finally:
        server.stop()


def worker_process(models_file: Path, url: str, prefix: str, name: str, lease_s: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ACCEL_DIFFUSION_QUEUE_BACKEND": "redis", "ACCEL_DIFFUSION_REDIS_URL": url,
           "ACCEL_DIFFUSION_REDIS_PREFIX": prefix, "ACCEL_DIFFUSION_LEASE_S": str(lease_s),
           "ACCEL_DIFFUSION_WORKER_NAME": name, "ACCEL_DIFFUSION_SERVED_MODELS": '["tiny"]',
           "ACCEL_DIFFUSION_WARMUP_STEPS": "0", "ACCEL_DIFFUSION_API_KEYS": f'["{KEY1}"]', "OMP_NUM_THREADS": "1",
           "ACCEL_DIFFUSION_ENGINE_ACCELERATION": "none"}  # the server's default compiles for minutes first
    return subprocess.Popen([sys.executable, "-m", "accel_diffusion.cli", "--models", str(models_file), "serve",
                             "--role", "worker", "--port", str(free_port())], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_worker_killed_mid_job_has_its_job_reclaimed_and_completed_once(tiny_models_file: Path,
                                                                          redis_url: str) -> None:
    prefix = "k" + uuid.uuid4().hex[:8]
    lease_s = 1.0
    doomed = worker_process(tiny_models_file, redis_url, prefix, "doomed", lease_s)
    try:
        with ExitStack() as stack:
            api = stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix,
                                                                           "api", lease_s=lease_s))))
            job_id = api.post("/v1/jobs", json={"model": "tiny", "prompt": "a", "steps": 60, "seed": 9},
                              headers=AUTH1).json()["id"]
            deadline = time.monotonic() + 120
            while api.get(f"/v1/jobs/{job_id}", headers=AUTH1).json()["progress"]["step"] < 2:
                assert time.monotonic() < deadline and doomed.poll() is None, "the worker process never ran the job"
                time.sleep(0.02)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
            killed_at = time.monotonic()
            stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix, "worker",
                                                                     lease_s=lease_s, worker_name="survivor"))))
            job = wait_job(api, job_id, ("succeeded", "failed", "cancelled"), AUTH1)
            assert job["status"] == "succeeded" and time.monotonic() - killed_at >= lease_s
            events = sse(api.get(f"/v1/jobs/{job_id}/events", headers=AUTH1).text)
            names = [e for _, e in events]
            assert names.count("job.completed") == 1 and names.count("job.started") == 2
            started = [e for e in api.app.state.server.redis.queue.events_after(job_id) if e.type == "job.started"]
            assert [e.data["attempt"] for e in started] == [1, 2]
            queue = api.app.state.server.redis.queue
            assert queue.redis.xpending(queue.queue_key("tiny"), "workers")["pending"] == 0
            expected = Engine(ModelRegistry.from_file(tiny_models_file)).generate(
                GenerationRequest.create(model="tiny", prompt="a", steps=60, seed=9)).to_uint8()[0]
            np.testing.assert_array_equal(decode(job["result"]["images"][0]["b64_json"]), expected)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(10)


def test_the_sdk_and_the_batch_cli_work_unchanged_through_two_replicas(tiny_models_file: Path, redis_url: str,
                                                                       tmp_path: Path) -> None:
    from accel_diffusion.clients import AccelClient
    from round_robin_proxy import running_proxy
    from server_clients import running_server

    from accel_diffusion.batch import LocalBackend, ServerBackend, run_batch

    prefix = "b" + uuid.uuid4().hex[:8]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(f'{{"prompt": "shape {i}", "seed": {20 + i}, "steps": 2, "n": {1 + i % 2}, '
                                f'"id": "r{i}"}}\n' for i in range(4)))
    with ExitStack() as stack:
        urls = [stack.enter_context(running_server(create_app(redis_settings(tiny_models_file, redis_url, prefix,
                                                                             "api"))))[2] for _ in range(2)]
        stack.enter_context(TestClient(create_app(redis_settings(tiny_models_file, redis_url, prefix, "worker",
                                                                 max_batch_size=2))))
        proxy, proxy_url = stack.enter_context(running_proxy(urls))
        with AccelClient(urls[0], api_key=KEY1) as first, AccelClient(urls[1], api_key=KEY1) as second:
            job = first.submit("a red circle", model="tiny", steps=2, seed=5)  # submitted on one replica,
            output = second.job(job.id).result(timeout=120)  # followed and fetched on the other
            events = list(second.job(job.id).events())
        assert output.seeds == [5] and [e.id for e in events] == [1, 2, 3, 4, 5]
        assert [e.type for e in events][-1] == "job.completed"
        expected = Engine(ModelRegistry.from_file(tiny_models_file)).generate(
            GenerationRequest.create(model="tiny", prompt="a red circle", steps=2, seed=5)).to_uint8()[0]
        np.testing.assert_array_equal(np.asarray(output.images[0]), expected)
        backend = ServerBackend(proxy_url, concurrency=4, api_key=KEY1)  # every request to the next replica
        try:
            report = run_batch(manifest, tmp_path / "served", backend, progress=False, default_model="tiny")
        finally:
            backend.close()
        assert report.ok and report.generated == 4 and report.images == 6
        assert min(proxy.sent) >= 4  # both replicas answered part of it
    local = run_batch(manifest, tmp_path / "local", LocalBackend(tiny_models_file), progress=False,
                      default_model="tiny")
    assert local.ok
    served = sorted((tmp_path / "served" / "images").iterdir())
    assert [p.name for p in served] == [p.name for p in sorted((tmp_path / "local" / "images").iterdir())]
    assert all(p.read_bytes() == (tmp_path / "local" / "images" / p.name).read_bytes() for p in served)
