"""Per-key quotas through the real app, with two API keys: queued and running jobs, finished jobs kept,
event-stream listeners (429 naming the quota, with Retry-After); one key never spends another's."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from accel_diffusion.server import create_app
from fastapi.testclient import TestClient
from server_clients import make_settings, running_server, wait_finished
from starlette.websockets import WebSocketDisconnect

PROMPT = "a red circle on a blue background"
LONG = {"prompt": PROMPT, "n": 4, "seed": 0, "steps": 150}
ALICE, BOB = ({"Authorization": f"Bearer {k}"} for k in ("alice-key", "bob-key"))


def two_keys(tiny_models_file: Path, **overrides: Any) -> Any:
    return make_settings(tiny_models_file, api_keys=["alice-key", "bob-key"], **overrides)


def test_one_keys_churn_never_evicts_another_keys_finished_job(tiny_models_file: Path) -> None:
    with TestClient(create_app(two_keys(tiny_models_file, max_finished_jobs=20))) as client:
        bobs = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 1}, headers=BOB).json()["id"]
        assert wait_finished(client, bobs, headers=BOB)["status"] == "succeeded"
        for _ in range(21):  # submitted and cancelled: no compute, but each one a finished job
            job = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 150}, headers=ALICE).json()["id"]
            client.post(f"/v1/jobs/{job}/cancel", headers=ALICE)
            wait_finished(client, job, headers=ALICE)
        assert client.get(f"/v1/jobs/{bobs}", headers=BOB).status_code == 200
        assert len(client.get("/v1/jobs", headers=ALICE).json()["data"]) == 19  # alice's own oldest went


def test_a_key_at_its_queued_quota_gets_429_naming_it_and_the_other_key_does_not(tiny_models_file: Path) -> None:
    with TestClient(create_app(two_keys(tiny_models_file, key_max_queued_jobs=2, queue_max=10))) as client:
        running = client.post("/v1/jobs", json=LONG, headers=ALICE).json()["id"]
        while client.get(f"/v1/jobs/{running}", headers=ALICE).json()["status"] == "queued":
            time.sleep(0.01)
        queued = [client.post("/v1/jobs", json=LONG, headers=ALICE) for _ in range(3)]
        assert [r.status_code for r in queued] == [202, 202, 429]
        error = queued[2].json()["error"]
        assert (error["type"], error["param"]) == ("quota_exceeded", "key_max_queued_jobs")
        assert "at most 2" in error["message"] and int(queued[2].headers["Retry-After"]) >= 1
        bobs = client.post("/v1/jobs", json=LONG, headers=BOB)
        assert bobs.status_code == 202
        for job in [running, *(r.json()["id"] for r in queued[:2])]:
            client.post(f"/v1/jobs/{job}/cancel", headers=ALICE)
        client.post(f"/v1/jobs/{bobs.json()['id']}/cancel", headers=BOB)


def test_a_batch_takes_at_most_key_max_running_jobs_of_one_key(tiny_models_file: Path) -> None:
    settings = make_settings(tiny_models_file, api_keys=["alice-key", "bob-key"], max_batch_size=4,
                             key_max_running_jobs=1)
    with TestClient(create_app(settings)) as client:
        blocker = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": 60}, headers=BOB).json()["id"]
        while client.get(f"/v1/jobs/{blocker}", headers=BOB).json()["status"] == "queued":
            time.sleep(0.01)
        short = {"prompt": PROMPT, "seed": 0, "steps": 2}
        ids = [(client.post("/v1/jobs", json=short, headers=key).json()["id"], key) for key in (ALICE, ALICE, BOB)]
        used = [wait_finished(client, job, headers=key)["result"]["batch_size_used"] for job, key in ids]
        assert used == [2, 1, 2]  # alice's first with bob's; alice's second in the next batch


def test_event_stream_listeners_are_capped_per_job_per_key_and_in_all(tiny_models_file: Path) -> None:
    settings = two_keys(tiny_models_file, max_sse_listeners_per_job=2, key_max_sse_listeners=3, max_sse_listeners=4)
    app = create_app(settings)
    with running_server(app) as (_, _, base), httpx.Client(base_url=base, timeout=60) as http, ExitStack() as opened:
        first = http.post("/v1/jobs", json=LONG, headers=ALICE).json()["id"]
        second = http.post("/v1/jobs", json=LONG, headers=ALICE).json()["id"]
        bobs = http.post("/v1/jobs", json=LONG, headers=BOB).json()["id"]

        def listen(job: str, key: dict[str, str]) -> httpx.Response:
            return opened.enter_context(http.stream("GET", f"/v1/jobs/{job}/events", headers=key))

        def refused(job: str, key: dict[str, str]) -> tuple[int, str, str]:
            response = http.get(f"/v1/jobs/{job}/events", headers=key)
            return response.status_code, response.json()["error"]["param"], response.headers["Retry-After"]

        assert [listen(first, ALICE).status_code for _ in range(2)] == [200, 200]
        assert refused(first, ALICE) == (429, "max_sse_listeners_per_job", "5")
        assert listen(second, ALICE).status_code == 200
        assert refused(second, ALICE) == (429, "key_max_sse_listeners", "5")
        assert listen(bobs, BOB).status_code == 200  # alice's listeners do not count against bob
        assert refused(bobs, BOB) == (429, "max_sse_listeners", "5")
        opened.close()  # the clients go away: their places free up
        deadline = time.monotonic() + 10
        while True:
            with http.stream("GET", f"/v1/jobs/{bobs}/events", headers=BOB) as again:
                status = again.status_code
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status == 200
        for job, key in ((first, ALICE), (second, ALICE), (bobs, BOB)):
            http.post(f"/v1/jobs/{job}/cancel", headers=key)


def test_a_key_at_its_stream_session_quota_is_closed_and_the_other_key_is_served(tiny_models_file: Path) -> None:
    """A key's sessions are counted where the server's are: at a successful session.start (a connection
    that has started nothing holds no session)."""
    settings = two_keys(tiny_models_file, key_max_stream_sessions=1, max_stream_sessions=4)
    start = {"type": "session.start", "prompt": "a red circle", "t_index_list": [45], "guidance": "none"}
    with TestClient(create_app(settings)) as client:
        with client.websocket_connect("/v1/stream?api_key=alice-key") as idle:
            idle.send_json({"type": "stats"})  # connected, no session: holds none of the quota
            assert idle.receive_json()["type"] == "stats"
            with client.websocket_connect("/v1/stream?api_key=alice-key") as first:
                first.send_json(start)
                assert first.receive_json()["type"] == "session.started"
                with client.websocket_connect("/v1/stream?api_key=alice-key") as second, \
                        pytest.raises(WebSocketDisconnect) as closed:
                    second.send_json(start)
                    second.receive_json()
                assert (closed.value.code, closed.value.reason) == (
                    1013, "at most 1 stream sessions per API key (key_max_stream_sessions)")
                with client.websocket_connect("/v1/stream?api_key=bob-key") as bobs:
                    bobs.send_json(start)
                    assert bobs.receive_json()["type"] == "session.started"
