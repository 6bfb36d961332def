"""The event loop's own work per request (benchmarks/server_hops.py): a job is checked with its strategy
prepared once, and the merge of a request's strategy over the model's default validates nothing twice."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest

from accel_diffusion.ar import generate as ar_generate
from accel_diffusion.engine import engine as engine_module
from accel_diffusion.strategy import Strategy

DEFAULT = Strategy.parse({"sampler": "dpmpp_2m", "schedule": {"name": "spacing", "spacing": "model"},
                          "guidance": {"name": "cfg", "scale": 5.0}})


@pytest.mark.parametrize("requested", [
    None,
    {"sampler": "ddim"},
    {"guidance": {"name": "cfg", "scale": 2.0}, "schedule": "karras"},
    {"sampler": {"name": "ddim", "eta": 0.5}, "schedule": "karras", "guidance": {"name": "apg", "scale": 4.0}},
], ids=["empty", "sampler", "guidance_and_schedule", "all"])
def test_resolved_over_equals_the_validated_merge(requested: dict[str, Any] | None) -> None:
    strategy = Strategy.parse(requested)
    merged = strategy.model_dump()
    for kind in ("sampler", "schedule", "guidance", "student", "runtime"):
        if merged[kind] is None:
            merged[kind] = getattr(DEFAULT, kind)
    validated = Strategy.model_validate(merged)  # what resolved_over returned before: every component validated
    resolved = strategy.resolved_over(DEFAULT)
    assert resolved == validated
    assert resolved.model_dump() == validated.model_dump()
    assert resolved.to_json() == validated.to_json()
    assert resolved.model_dump(exclude_none=True) == validated.model_dump(exclude_none=True)


def test_resolved_over_still_refuses_an_unresolved_auto() -> None:
    with pytest.raises(Exception, match="'auto' has not been resolved"):
        Strategy.parse("auto").resolved_over(DEFAULT)


def test_a_server_prepares_an_accepted_job_strategy_once(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the device worker (the route's thread), one prepare_strategy and one AR-model file check per
    request; the errors stay the same (a bad component: 400 naming it)."""
    calls: Counter[str] = Counter()
    prepare, is_ar = engine_module.prepare_strategy, engine_module.is_ar_spec

    def counted(name: str, func: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread().name != "accel-diffusion-worker":
                calls[name] += 1
            return func(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(engine_module, "prepare_strategy", counted("prepare", prepare))
    monkeypatch.setattr(engine_module, "is_ar_spec", counted("is_ar", is_ar))
    monkeypatch.setattr(ar_generate, "is_ar_spec", counted("is_ar", is_ar))
    body = {"prompt": "a red circle", "steps": 2, "seed": 3, "size": "32x32"}
    answers = [client.post("/v1/images/generations", json=body),
               client.post("/v1/jobs", json={**body, "strategy": {"sampler": "ddim"}})]
    assert [a.status_code for a in answers] == [200, 202]
    assert calls == {"prepare": 2, "is_ar": 2}
    refused = client.post("/v1/jobs", json={**body, "strategy": {"sampler": {"name": "ddim", "eta": -1}}})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "strategy.sampler.eta"


def test_the_job_store_counts_queued_jobs_as_a_scan_would() -> None:
    """``count(owner, QUEUED)`` (the key_max_queued_jobs check of every request) is kept as jobs are added,
    start, finish and go, and agrees with a scan of the kept jobs at every step."""
    from accel_diffusion.server.jobs import Job, JobStatus, JobStore

    from accel_diffusion.strategy import GenerationRequest

    store = JobStore(ttl_s=3600, max_finished=3)
    request = GenerationRequest.create(model="shapes", prompt="x", seed=0)

    def scan(owner: str | None) -> int:
        return sum(1 for j in store.all() if j.owner == owner and j.status is JobStatus.QUEUED)

    def agree() -> list[int]:
        counts = [store.count(owner, JobStatus.QUEUED) for owner in (None, "a", "b")]
        assert counts == [scan(owner) for owner in (None, "a", "b")]
        return counts

    jobs = [Job(request=request, owner=owner) for owner in ("a", "a", "b", None, "a", "b")]
    early = Job(request=request, owner="b")
    early.start()  # the worker may start a job before the route adds it to the store
    store.add(early)
    for job in jobs:
        store.add(job)
    assert agree() == [1, 3, 2]
    jobs[0].start()
    assert agree() == [1, 2, 2]
    jobs[1].finish(JobStatus.CANCELLED)  # cancelled while queued
    jobs[0].finish(JobStatus.SUCCEEDED, result={"images": []})
    assert agree() == [1, 1, 2]
    for job in jobs[2:]:
        job.start()
        job.finish(JobStatus.FAILED, error={"type": "internal_error"})
    early.finish(JobStatus.SUCCEEDED, result={"images": []})
    assert agree() == [0, 0, 0]
    assert len(store.all()) == 3  # the finished past max_finished went
    store.add(late := Job(request=request, owner="a"))
    assert agree() == [0, 1, 0]
    late.finish(JobStatus.CANCELLED)
    assert agree() == [0, 0, 0]


def test_the_server_runs_on_uvloop_and_httptools() -> None:
    """``accel-diffusion serve`` (and the images, whose command it is) runs uvicorn on uvloop with the httptools
    parser: the server extra installs both (uvicorn[standard]), and uvicorn's "auto" picks them."""
    import uvloop
    from accel_diffusion.server.process import uvicorn_config
    from accel_diffusion.server.settings import ServerSettings
    from fastapi import FastAPI
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn_config(FastAPI(), ServerSettings())
    config.load()
    assert issubclass(config.http_protocol_class, HttpToolsProtocol)
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
