"""Job store retention (TTL and cap on finished jobs) and the job state machine."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from accel_diffusion.server.jobs import Job, JobStatus, JobStore, QuotaExceededError

from accel_diffusion.strategy import GenerationRequest


def make_job() -> Job:
    return Job(request=GenerationRequest.create(model="tiny", prompt="a"))


def test_finished_jobs_expire_and_are_capped() -> None:
    store = JobStore(ttl_s=60, max_finished=2)
    jobs = [make_job() for _ in range(4)]
    for job in jobs:
        store.add(job)
    for job in jobs[:3]:
        job.finish(JobStatus.SUCCEEDED, result={})
    assert [j.id for j in store.all()] == [jobs[1].id, jobs[2].id, jobs[3].id]  # oldest finished dropped
    jobs[1].completed_at = time.time() - 120  # past the TTL
    assert [j.id for j in store.all()] == [jobs[2].id, jobs[3].id]
    assert store.get(jobs[3].id) is jobs[3]  # unfinished jobs are never dropped


def test_state_machine_and_events() -> None:
    job = make_job()
    job.emit("job.queued", {"position": 0})
    job.start()
    job.progress(1, 2)
    job.finish(JobStatus.CANCELLED)
    job.finish(JobStatus.SUCCEEDED, result={})  # a finished job stays finished
    assert job.status is JobStatus.CANCELLED and job.result is None
    assert [(e.id, e.type) for e in job.events] == [(1, "job.queued"), (2, "job.started"), (3, "job.progress"),
                                                    (4, "job.cancelled")]
    assert [e.id for e in job.events_after(2)] == [3, 4]
    public = job.public(queue_position=None)
    assert public["status"] == "cancelled" and public["progress"] == {"step": 1, "total": 2, "fraction": 0.5}


def test_a_finished_job_does_not_change_and_jobs_compare_by_identity() -> None:
    job = make_job()
    job.start()
    assert job.finish(JobStatus.CANCELLED) is True
    events = len(job.events)
    job.start()  # a cancelled job in a batch that runs on for the others
    job.progress(3, 4)
    assert job.finish(JobStatus.SUCCEEDED, result={}) is False
    assert job.status is JobStatus.CANCELLED and job.step == 0 and len(job.events) == events
    twin = Job(request=job.request)
    assert twin != job and twin not in [job]  # queue lookups never compare requests field by field


def test_a_job_keeps_only_its_latest_previews_images() -> None:
    job = make_job()
    for step in (2, 4):
        job.emit("job.preview", {"step": step, "b64_json": [f"image-{step}"]})
    assert [e.data for e in job.events] == [{"step": 2, "superseded": True}, {"step": 4, "b64_json": ["image-4"]}]


def finished_with_images(store: JobStore, chars: int, delivered_by_caller: bool = False) -> Job:
    job = Job(request=GenerationRequest.create(model="tiny", prompt="a"), delivered_by_caller=delivered_by_caller)
    store.add(job)
    job.finish(JobStatus.SUCCEEDED, result={"images": [{"seed": 1, "b64_json": "A" * chars}, {"seed": 2,
                                                                                            "b64_json": "B"}]})
    return job


def test_the_images_held_by_finished_jobs_are_capped_oldest_first() -> None:
    store = JobStore(ttl_s=60, max_finished=100, max_image_bytes=2500)
    old, middle = finished_with_images(store, 999), finished_with_images(store, 999)
    assert old.image_bytes == middle.image_bytes == 1000 and store.get(old.id) is old  # 2000 held: under the cap
    new = finished_with_images(store, 999)
    assert store.get(new.id) is new  # 3000 held: the oldest job's images go, the job stays
    assert old.result is not None and old.result["images_released"] and old.image_bytes == 0
    assert [im["b64_json"] for im in old.result["images"]] == [None, None]
    assert [im["seed"] for im in old.result["images"]] == [1, 2]
    assert middle.result is not None and "images_released" not in middle.result and new.image_bytes == 1000
    completed = [e for e in old.events if e.type == "job.completed"]
    assert completed[0].data["result"]["images_released"]  # an SSE replay does not carry them either


def test_a_synchronous_calls_images_are_never_evicted_before_delivery() -> None:
    store = JobStore(ttl_s=60, max_finished=100, max_image_bytes=0)
    synchronous = finished_with_images(store, 5000, delivered_by_caller=True)
    queued = finished_with_images(store, 10)
    assert store.get(synchronous.id) is synchronous
    assert synchronous.image_bytes == 5001 and queued.image_bytes == 0  # the other job's images went
    synchronous.release_images()  # the caller delivered them
    assert synchronous.image_bytes == 0 and synchronous.result is not None and synchronous.result["images_released"]


def test_without_a_cap_images_are_kept_and_a_result_supersedes_the_previews() -> None:
    store = JobStore(ttl_s=60, max_finished=100)
    job = Job(request=GenerationRequest.create(model="tiny", prompt="a"))
    store.add(job)
    job.emit("job.preview", {"step": 2, "b64_json": ["image-2"]})
    job.finish(JobStatus.SUCCEEDED, result={"images": [{"seed": 1, "b64_json": "A" * 10**6}]})
    assert store.get(job.id) is job and job.image_bytes == 10**6
    assert [e.data for e in job.events if e.type == "job.preview"] == [{"step": 2, "superseded": True}]


def test_a_cancelled_jobs_last_preview_counts_towards_the_cap_and_is_released() -> None:
    store = JobStore(ttl_s=60, max_finished=100, max_image_bytes=10)
    job = Job(request=GenerationRequest.create(model="tiny", prompt="a"))
    store.add(job)
    job.emit("job.preview", {"step": 2, "b64_json": ["P" * 50]})
    job.finish(JobStatus.CANCELLED)
    assert job.image_bytes == 50  # a cancelled job keeps its last preview: counted
    store.get(job.id)  # over the cap: released
    assert job.image_bytes == 0 and [e.data for e in job.events if e.type == "job.preview"] == [
        {"step": 2, "superseded": True}]


def owned(store: JobStore, owner: str | None, status: JobStatus = JobStatus.CANCELLED, chars: int = 0) -> Job:
    job = Job(request=GenerationRequest.create(model="tiny", prompt="a"), owner=owner)
    store.add(job)
    job.finish(status, result={"images": [{"seed": 1, "b64_json": "A" * chars}]} if chars else None)
    return job


def test_one_owners_churn_never_evicts_another_owners_finished_jobs() -> None:
    store = JobStore(ttl_s=60, max_finished=20)  # the global cap only: the owner keeping the most gives up
    bob = owned(store, "bob")
    alice = [owned(store, "alice") for _ in range(21)]
    kept = store.all()
    assert bob in kept and len(kept) == 20 and [j for j in kept if j.owner == "alice"] == alice[2:]
    quota = JobStore(ttl_s=60, max_finished=20, key_max_finished=5)  # a key's own quota: its own oldest go
    carol = owned(quota, None)  # without API keys: one tenant, like any key
    dave = [owned(quota, "dave") for _ in range(8)]
    assert quota.all() == [carol, *dave[3:]]


def test_image_bytes_are_released_from_the_owner_holding_the_most() -> None:
    store = JobStore(ttl_s=60, max_finished=100, max_image_bytes=500)
    bob = owned(store, "bob", JobStatus.SUCCEEDED, chars=100)  # the oldest images of all
    alice = [owned(store, "alice", JobStatus.SUCCEEDED, chars=100) for _ in range(6)]
    store.all()
    assert bob.image_bytes == 100 and [j.image_bytes for j in alice] == [0, 0, 100, 100, 100, 100]
    quota = JobStore(ttl_s=60, max_finished=100, max_image_bytes=10_000, key_max_image_bytes=250)
    carol = owned(quota, "carol", JobStatus.SUCCEEDED, chars=100)
    dave = [owned(quota, "dave", JobStatus.SUCCEEDED, chars=100) for _ in range(4)]
    quota.all()
    assert carol.image_bytes == 100 and [j.image_bytes for j in dave] == [0, 0, 100, 100]


def test_listeners_are_capped_per_job_per_owner_and_in_all_and_released_once() -> None:
    store = JobStore(ttl_s=60, max_finished=100, max_listeners=4, key_max_listeners=3, job_max_listeners=2)
    first, second = make_job(), make_job()
    releases = [store.open_listener(first, "alice"), store.open_listener(first, "alice")]
    with pytest.raises(QuotaExceededError) as per_job:
        store.open_listener(first, "bob")
    releases.append(store.open_listener(second, "alice"))
    with pytest.raises(QuotaExceededError) as per_key:
        store.open_listener(second, "alice")
    releases.append(store.open_listener(second, "bob"))
    with pytest.raises(QuotaExceededError) as in_all:
        store.open_listener(make_job(), "carol")
    assert (per_job.value.quota, per_key.value.quota, in_all.value.quota) == (
        "max_sse_listeners_per_job", "key_max_sse_listeners", "max_sse_listeners")
    releases[0]()
    releases[0]()  # released once: a second call frees nothing more
    releases.append(store.open_listener(first, "bob"))
    with pytest.raises(QuotaExceededError):
        store.open_listener(make_job(), "carol")


def test_an_event_wakes_all_of_a_loops_listeners_with_one_call_from_the_worker_thread() -> None:
    async def fan_out() -> int:
        loop = asyncio.get_running_loop()
        calls = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:  # counts, then schedules for real
            nonlocal calls
            calls += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        job = make_job()
        watches = [job.watch() for _ in range(400)]
        waits = [watch.next().wait() for watch in watches]
        on_worker(job.progress, 1, 2)
        await asyncio.wait_for(asyncio.gather(*waits), 5)
        for watch in watches:
            job.unwatch(watch)
        on_worker(job.progress, 2, 2)  # nobody listens: nothing is scheduled
        return calls

    def on_worker(step: Any, *args: int) -> None:  # on another thread, as the worker's
        thread = threading.Thread(target=step, args=args)
        thread.start()
        thread.join()

    assert asyncio.run(fan_out()) == 1
