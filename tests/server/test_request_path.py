"""The synchronous request path of a real uvicorn server hands the request to the device worker and back, and
to no other thread: FastAPI runs a plain ``def`` dependency in its thread pool, and those hand-offs were most
of a request's time outside the engine (benchmarks/server_hops.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from accel_diffusion.server import create_app
from server_clients import make_settings, running_server

BODY = {"prompt": "a red circle", "steps": 2, "seed": 3, "size": "32x32"}


@pytest.mark.parametrize("keys", [[], ["sk-path"]], ids=["open", "with_api_keys"])
def test_generations_and_job_routes_run_no_thread_pool_calls(tiny_models_file: Path, keys: list[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pool_calls: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:  # the real pool call, counted
        pool_calls.append(getattr(func, "__qualname__", repr(func)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    headers = {"Authorization": "Bearer sk-path"} if keys else {}
    with running_server(create_app(make_settings(tiny_models_file, api_keys=keys))) as (_, _, url), \
            httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        answers = [client.post("/v1/images/generations", json=BODY) for _ in range(3)]
        job_id = answers[-1].json()["id"]
        listed = client.get("/v1/jobs")
        one = client.get(f"/v1/jobs/{job_id}")
        cancel = client.post(f"/v1/jobs/{job_id}/cancel")
        refused = httpx.post(f"{url}/v1/images/generations", json=BODY, timeout=60)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["seeds"] for a in answers] == [[3], [3], [3]]
    assert answers[0].json()["data"][0]["b64_json"] == answers[2].json()["data"][0]["b64_json"]
    assert (listed.status_code, one.status_code, cancel.status_code) == (200, 200, 200)
    assert one.json()["status"] == cancel.json()["status"] == "succeeded"
    assert [j["id"] for j in listed.json()["data"]] == [a.json()["id"] for a in answers]
    assert refused.status_code == (401 if keys else 200)
    assert pool_calls == []  # no dependency, route or response ran in a thread pool
