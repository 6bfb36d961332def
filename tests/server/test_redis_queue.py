"""The Redis job queue against a real redis-server: leases, reclaim, exactly-once results, cancel, events with
resumable ids, queue stats, persistence across a Redis crash, and the worker runner on a real DeviceWorker."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.server.jobs import OutputOptions, QueueFullError, QuotaExceededError
from accel_diffusion.server.metrics import ServerMetrics
from accel_diffusion.server.redis_backend import RedisJobQueue
from accel_diffusion.server.redis_worker import Publisher, RedisJobRunner
from accel_diffusion.server.worker import DeviceWorker
from conftest import require_tool
from redis_server import RedisServer
from server_clients import decode

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest


def make_queue(url: str, prefix: str, lease_s: float = 30.0) -> RedisJobQueue:
    return RedisJobQueue(url, prefix=prefix, lease_s=lease_s, ttl_s=60)


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:8]  # each test its own keys on the shared server


def request(steps: int = 2, seed: int = 1) -> GenerationRequest:
    return GenerationRequest.create(model="tiny", prompt="a red circle", steps=steps, seed=seed)


def types(queue: RedisJobQueue, job_id: str) -> list[str]:
    return [e.type for e in queue.events_after(job_id)]


def test_the_owner_completes_once_and_a_worker_whose_lease_was_taken_writes_nothing(redis_url: str,
                                                                                       prefix: str) -> None:
    api, a, b = (make_queue(redis_url, prefix, lease_s=0.2) for _ in range(3))  # three processes' clients
    api.enqueue("job_1", request(), OutputOptions(), owner="key1")
    [first] = a.claim(["tiny"], "worker-a", 1, block_ms=100)
    assert (first.job_id, first.attempt, first.owner) == ("job_1", 1, "key1")
    assert a.emit(first, "job.progress", {"step": 1, "total": 2}, 1, 2)
    assert b.claim(["tiny"], "worker-b", 1, block_ms=100) == []  # held by a: nothing for b yet
    time.sleep(0.3)  # a stops renewing (it died): past the lease, b reclaims
    [second] = b.claim(["tiny"], "worker-b", 1, block_ms=100)
    assert (second.job_id, second.attempt, second.entry_id) == ("job_1", 2, first.entry_id)
    assert a.renew("tiny", "worker-a", [first.entry_id]) == []  # a zombie's renewal does not take it back
    assert not a.emit(first, "job.progress", {"step": 2, "total": 2}, 2, 2)  # fenced: a stale attempt adds nothing
    assert b.complete(second, "worker-b", "succeeded", {"images": [], "nfe": 2}) == 1
    assert a.complete(first, "worker-a", "succeeded", {"images": [], "nfe": 99}) == -1
    assert b.complete(second, "worker-b", "succeeded", {"images": [], "nfe": 98}) == -1  # acked: done
    job = api.public(api.get("job_1"))
    assert (job["status"], job["result"]["nfe"]) == ("succeeded", 2)
    assert types(api, "job_1") == ["job.queued", "job.progress", "job.completed"]
    assert api.redis.xpending(api.queue_key("tiny"), "workers")["pending"] == 0
    assert 0 < api.redis.ttl(f"{prefix}:job:job_1") <= 60 and 0 < api.redis.ttl(f"{prefix}:res:job_1") <= 60


def test_a_job_whose_workers_all_die_is_given_up_after_max_deliveries_and_dead_lettered(redis_url: str,
                                                                                          prefix: str) -> None:
    api = make_queue(redis_url, prefix)
    workers = [RedisJobQueue(redis_url, prefix=prefix, lease_s=0.1, ttl_s=60, max_deliveries=3) for _ in range(5)]
    api.enqueue("job_1", request(), OutputOptions(), owner="key1")
    api.enqueue("job_2", request(seed=2), OutputOptions(), owner="key1")
    claims = []
    for index in range(3):  # three workers claim job_1 and die holding it (never renew, never ack)
        claimed = workers[index].claim(["tiny"], f"worker-{index}", 1, block_ms=100)
        assert [(c.job_id, c.attempt) for c in claimed] == [("job_1", index + 1)]
        claims.append(claimed[0])
        time.sleep(0.15)  # past the lease
    fourth = workers[3].claim(["tiny"], "worker-3", 1, block_ms=100)
    assert fourth == []  # job_1 given up, not run a fourth time (job_2 waits: only reclaims were due)
    job = api.public(api.get("job_1"))
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    assert "3 times (max_deliveries)" in job["error"]["message"] and job["result"] is None
    events = api.events_after("job_1")
    assert [e.type for e in events] == ["job.queued", "job.failed"]
    assert events[-1].data["error"]["code"] == "worker_lost"
    [(_, dead)] = api.redis.xrange(api.dead_letter_key("tiny"))
    assert dead["job"] == "job_1" and dead["entry"] == claims[0].entry_id
    assert (dead["deliveries"], dead["last_consumer"]) == ("3", "worker-2")
    assert api.redis.xpending(api.queue_key("tiny"), "workers")["pending"] == 0  # acked: never delivered again
    assert workers[2].complete(claims[2], "worker-2", "succeeded", {"images": []}) == -1  # a zombie writes nothing
    time.sleep(0.15)
    assert [c.job_id for c in workers[4].claim(["tiny"], "worker-4", 2, block_ms=100)] == ["job_2"]
    time.sleep(0.15)
    assert [c.job_id for c in workers[0].claim(["tiny"], "worker-0", 2, block_ms=100)] == ["job_2"]  # reclaimed
    assert api.get("job_1")["attempt"] == "3" and api.redis.xlen(api.dead_letter_key("tiny")) == 1
    assert api.public(api.get("job_1"))["status"] == "failed"


def test_admission_checks_the_keys_queued_quota_and_the_queue_cap_in_the_same_call(redis_url: str,
                                                                                     prefix: str) -> None:
    api, other = make_queue(redis_url, prefix), make_queue(redis_url, prefix)

    def admit(job_id: str, owner: str) -> dict[str, str]:
        return api.admit(job_id, request(), OutputOptions(), owner, key_max_queued=2, queue_max=3)[0]

    record = admit("job_1", "a")
    assert api.public(record, terminal="") == other.public(other.get("job_1"))  # the answer is the record as read
    admit("job_2", "a")
    with pytest.raises(QuotaExceededError) as quota:
        admit("job_3", "a")  # a has 2 queued
    assert (quota.value.quota, quota.value.limit) == ("key_max_queued_jobs", 2)
    admit("job_3", "b")  # b has none: 3 wait in the queue now
    with pytest.raises(QueueFullError) as full:
        admit("job_4", "c")
    assert full.value.limit == 3 and api.get("job_4") is None and api.stats("tiny").waiting == 3
    [claim] = other.claim(["tiny"], "w", 1, block_ms=100)  # job_1 runs: a has 1 queued, 2 wait
    assert claim.job_id == "job_1"
    admit("job_4", "a")
    assert [r["id"] for r in api.jobs_of("a")] == ["job_1", "job_2", "job_4"]
    assert api.stats("tiny").waiting == 3


def test_a_renewed_lease_keeps_a_long_job_with_its_worker(redis_url: str, prefix: str) -> None:
    api, a, b = (make_queue(redis_url, prefix, lease_s=0.3) for _ in range(3))
    api.enqueue("job_1", request(), OutputOptions(), owner=None)
    [claim] = a.claim(["tiny"], "worker-a", 1, block_ms=100)
    for _ in range(6):  # 0.6 s: twice the lease, renewed every third of it
        time.sleep(0.1)
        assert a.renew("tiny", "worker-a", [claim.entry_id]) == [claim.entry_id]
    assert b.claim(["tiny"], "worker-b", 1, block_ms=50) == []


def test_events_are_numbered_and_resume_after_last_event_id_on_any_replica(redis_url: str, prefix: str) -> None:
    one, two = make_queue(redis_url, prefix), make_queue(redis_url, prefix)
    one.enqueue("job_1", request(), OutputOptions(), owner=None)
    [claim] = one.claim(["tiny"], "w", 1, block_ms=100)
    for step in (1, 2):
        one.emit(claim, "job.progress", {"step": step, "total": 2}, step, 2)
    one.complete(claim, "w", "succeeded", {"images": [{"b64_json": "AAAA", "seed": 7}]})
    events = two.events_after("job_1")
    assert [e.type for e in events] == ["job.queued", "job.progress", "job.progress", "job.completed"]
    ids = [e.id for e in events]
    assert ids == [1, 2, 3, 4]  # as in memory mode: one more per event
    resumed = one.events_after("job_1", last_id=ids[1])
    assert [e.id for e in resumed] == ids[2:]  # no gap, no duplicate
    assert resumed[-1].data == {"result": {"images": [{"b64_json": "AAAA", "seed": 7}]}}
    assert two.public(two.get("job_1"))["progress"] == {"step": 2, "total": 2, "fraction": 1.0}


def test_a_queued_job_cancelled_on_another_replica_never_runs(redis_url: str, prefix: str) -> None:
    api_one, api_two, worker = (make_queue(redis_url, prefix) for _ in range(3))
    api_one.enqueue("job_1", request(), OutputOptions(), owner=None)
    api_one.enqueue("job_2", request(), OutputOptions(), owner=None)
    assert api_two.cancel("job_1") == 1
    assert api_two.cancel("job_1") == -1  # already finished
    assert api_two.cancel("job_unknown") == -1
    assert api_one.public(api_one.get("job_1"))["status"] == "cancelled"
    claimed = worker.claim(["tiny"], "w", 2, block_ms=100)
    assert [c.job_id for c in claimed] == ["job_2"]  # job_1 acked unrun
    assert worker.redis.xpending(worker.queue_key("tiny"), "workers")["pending"] == 1
    assert types(api_one, "job_1") == ["job.queued", "job.cancelled"]


def test_queue_depth_and_oldest_age_are_the_same_from_every_process(redis_url: str, prefix: str) -> None:
    one, two = make_queue(redis_url, prefix), make_queue(redis_url, prefix)
    one.enqueue("job_1", request(), OutputOptions(), owner=None)
    time.sleep(0.2)
    one.enqueue("job_2", request(), OutputOptions(), owner=None)
    one.enqueue("job_3", request(), OutputOptions(), owner=None)
    first, second = one.stats("tiny"), two.stats("tiny")
    assert (first.waiting, first.pending, first.depth) == (3, 0, 3) == (second.waiting, second.pending, second.depth)
    assert 0.2 <= first.oldest_age_s < 5 and abs(first.oldest_age_s - second.oldest_age_s) < 0.1
    two.claim(["tiny"], "w", 1, block_ms=100)  # job_1 claimed: the oldest waiting is job_2, 0.2 s younger
    after = one.stats("tiny")
    assert (after.waiting, after.pending, after.depth) == (2, 1, 3)
    assert after.oldest_age_s < first.oldest_age_s
    assert one.stats("other").depth == 0


def test_the_queue_drops_finished_entries_and_keeps_pending_and_waiting_ones(redis_url: str, prefix: str) -> None:
    queue = make_queue(redis_url, prefix)
    for index in range(5):
        queue.enqueue(f"job_{index}", request(), OutputOptions(), owner=None)
    claims = queue.claim(["tiny"], "w", 3, block_ms=100)  # job_0..2 delivered
    for claim in (claims[0], claims[2]):
        assert queue.complete(claim, "w", "succeeded", {"images": []}) == 1
    assert queue.trim("tiny") == 1  # job_0 only: job_1 is still pending
    assert queue.redis.xlen(queue.queue_key("tiny")) == 4
    assert queue.complete(claims[1], "w", "succeeded", {"images": []}) == 1
    assert queue.trim("tiny") == 1  # up to the last delivered (job_2), which stays as the group's mark
    stats = queue.stats("tiny")
    assert (stats.waiting, stats.pending) == (2, 0)  # the backlog is still counted exactly
    assert [c.job_id for c in queue.claim(["tiny"], "w", 5, block_ms=100)] == ["job_3", "job_4"]


def test_queued_jobs_survive_a_redis_crash_with_persistence(tmp_path: Path) -> None:
    server = RedisServer(require_tool("redis-server"), tmp_path, persistent=True)
    server.start()
    try:
        queue = make_queue(server.url, "p")
        queue.enqueue("job_1", request(seed=3), OutputOptions(output_format="webp"), owner="key1")
        queue.enqueue("job_2", request(), OutputOptions(), owner=None)
        server.kill()
        server.start()  # same port, same dir: the AOF is replayed
        after = make_queue(server.url, "p")
        assert after.stats("tiny").waiting == 2
        claimed = after.claim(["tiny"], "w", 2, block_ms=100)
        assert [(c.job_id, c.request.seed, c.output.output_format, c.owner) for c in claimed] == [
            ("job_1", 3, "webp", "key1"), ("job_2", 1, "png", None)]
    finally:
        server.stop()


def test_finished_jobs_images_are_capped_per_key_and_in_all_oldest_first(redis_url: str, prefix: str) -> None:
    queue = RedisJobQueue(redis_url, prefix=prefix, ttl_s=60, max_image_bytes=25, key_max_image_bytes=15)

    def finish(job_id: str, owner: str, nbytes: int) -> None:
        queue.enqueue(job_id, request(), OutputOptions(), owner=owner)
        [claim] = queue.claim(["tiny"], "w", 1, block_ms=100)
        assert queue.complete(claim, "w", "succeeded", {"images": [{"b64_json": "A" * nbytes, "seed": 1}]}) == 1
        queue.hold_images(job_id, owner, nbytes)
        time.sleep(0.01)  # distinct completion times

    def released(job_id: str) -> bool:
        result = queue.public(queue.get(job_id))["result"]
        return bool(result.get("images_released")) and result["images"][0]["b64_json"] is None

    finish("a1", "a", 10)
    finish("a2", "a", 10)  # a holds 20 > 15: its oldest goes
    assert [released(j) for j in ("a1", "a2")] == [True, False]
    assert (queue.held_image_bytes("a"), queue.held_image_bytes()) == (10, 10)
    finish("b1", "b", 8)
    finish("b2", "b", 5)  # 23 in all: under 25
    assert queue.held_image_bytes() == 23 and not any(released(j) for j in ("a2", "b1", "b2"))
    finish("b3", "b", 4)  # b holds 17 > 15: b1 goes (b: 9, all: 19)
    assert released("b1") and queue.held_image_bytes() == 19
    finish("c1", "c", 9)  # 28 > 25: the owner holding the most (a, 10) gives up its oldest
    assert released("a2") and not released("c1") and queue.held_image_bytes() == 18
    assert queue.release_images("c1") and not queue.release_images("c1")  # once
    assert released("c1") and queue.held_image_bytes() == 9
    assert queue.events_after("c1")[-1].data["result"]["images_released"] is True


def test_finished_jobs_are_kept_per_key_and_in_all_the_key_keeping_the_most_gives_one_up(redis_url: str,
                                                                                           prefix: str) -> None:
    queue = RedisJobQueue(redis_url, prefix=prefix, ttl_s=60, key_max_finished=2, max_finished=4)

    def finish(job_id: str, owner: str | None, nbytes: int = 0) -> list[str]:
        queue.enqueue(job_id, request(), OutputOptions(), owner=owner)
        [claim] = queue.claim(["tiny"], "w", 2, block_ms=100)  # (a cancelled job's entry before it is skipped)
        assert queue.complete(claim, "w", "succeeded", {"images": [{"b64_json": "A" * nbytes, "seed": 1}]}) == 1
        queue.hold_images(job_id, owner, nbytes)
        time.sleep(0.01)  # distinct completion times
        return queue.retain(job_id)

    def kept(owner: str | None) -> list[str]:
        return [r["id"] for r in queue.jobs_of(owner)]

    assert finish("a1", "a", 10) == [] and finish("a2", "a") == []
    assert finish("a3", "a") == ["a1"]  # a past its 2: its oldest goes, with its keys and images
    assert kept("a") == ["a2", "a3"] and queue.get("a1") is None and queue.events_after("a1") == []
    assert queue.held_image_bytes("a") == 0 and queue.retain("a3") == []  # idempotent
    assert finish("b1", "b") == []
    queue.enqueue("c1", request(), OutputOptions(), owner=None)
    assert queue.cancel("c1") == 1  # a cancelled queued job counts too (4 in all: a 2, b 1, no key 1)
    assert kept(None) == ["c1"] and kept("b") == ["b1"]
    assert finish("d1", "d") == ["a2"]  # 5 > 4: a, keeping the most, gives up its oldest; b's and d's stay
    assert (kept("a"), kept("b"), kept("d"), kept(None)) == (["a3"], ["b1"], ["d1"], ["c1"])
    assert queue.redis.zrange(f"{prefix}:fin:owners", 0, -1, withscores=True) == [
        ("-", 1.0), ("a", 1.0), ("b", 1.0), ("d", 1.0)]
    queue.enqueue("a4", request(), OutputOptions(), owner="a")  # queued jobs are not finished ones: none dropped
    assert kept("a") == ["a3", "a4"] and queue.stats("tiny").waiting == 1


def test_the_publisher_sends_events_in_order_and_flush_waits_for_them(redis_url: str, prefix: str) -> None:
    queue = make_queue(redis_url, prefix)
    queue.enqueue("job_1", request(steps=40), OutputOptions(), owner=None)
    [claim] = queue.claim(["tiny"], "w", 1, block_ms=100)
    publisher = Publisher(queue)
    publisher.start()
    for step in range(1, 41):
        publisher.put(lambda pipe, step=step: queue.emit(claim, "job.progress", {"step": step, "total": 40}, step, 40,
                                                         client=pipe))
    publisher.flush()
    events = queue.events_after("job_1")
    assert [e.id for e in events] == list(range(1, 42))
    assert [e.data["step"] for e in events[1:]] == list(range(1, 41))
    assert queue.public(queue.get("job_1"))["progress"] == {"step": 40, "total": 40, "fraction": 1.0}


# ---- the runner on a real DeviceWorker ------------------------------------------------------

@pytest.fixture(scope="module")
def device(tiny_models_file: Path) -> Iterator[DeviceWorker]:
    worker = DeviceWorker(Engine(ModelRegistry.from_file(tiny_models_file)), queue_max=8, metrics=ServerMetrics(),
                          max_batch_size=2)
    worker.start()
    yield worker
    worker.stop(30)


def wait_status(queue: RedisJobQueue, job_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.public(queue.get(job_id))
        if job["status"] in statuses:
            return job
        time.sleep(0.01)
    raise TimeoutError(f"{job_id} never reached {statuses}")


def test_the_runner_runs_batches_and_gives_the_images_of_memory_mode(redis_url: str, prefix: str,
                                                                     device: DeviceWorker) -> None:
    api = make_queue(redis_url, prefix)
    for index in range(3):
        api.enqueue(f"job_{index}", request(seed=10 + index), OutputOptions(), owner=None)
    runner = RedisJobRunner(make_queue(redis_url, prefix), device, ["tiny"], "worker-1", batch_size=2)
    runner.start()
    try:
        jobs = [wait_status(api, f"job_{index}", ("succeeded", "failed")) for index in range(3)]
    finally:
        runner.stop(10)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3
    assert [j["result"]["batch_size_used"] for j in jobs] == [2, 2, 1]  # claimed two at once, batched
    for index, job in enumerate(jobs):
        alone = device.engine.generate(request(seed=10 + index)).to_uint8()[0]
        np.testing.assert_array_equal(decode(job["result"]["images"][0]["b64_json"]), alone)  # batch-invariant
        assert types(api, f"job_{index}") == ["job.queued", "job.started", "job.progress", "job.progress",
                                              "job.completed"]
        assert api.events_after(f"job_{index}")[1].data == {"attempt": 1}
    assert api.stats("tiny").depth == 0
    assert len(base64.b64decode(jobs[0]["result"]["images"][0]["b64_json"])) > 0


def test_a_running_job_cancelled_on_another_replica_stops_at_its_next_step(redis_url: str, prefix: str,
                                                                            device: DeviceWorker) -> None:
    api = make_queue(redis_url, prefix)
    api.enqueue("job_1", GenerationRequest.create(model="tiny", prompt="a", steps=150, preview_every=1),
                OutputOptions(), owner=None)
    runner = RedisJobRunner(make_queue(redis_url, prefix), device, ["tiny"], "worker-1", poll_s=0.05)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while api.public(api.get("job_1"))["progress"]["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert make_queue(redis_url, prefix).cancel("job_1") == 0  # running: its worker stops it
        job = wait_status(api, "job_1", ("cancelled", "succeeded", "failed"))
    finally:
        runner.stop(10)
    assert job["status"] == "cancelled" and job["progress"]["step"] < 150
    previews = [e for e in api.events_after("job_1") if e.type == "job.preview"]
    assert len(previews) >= 2 and all(e.data == {"step": e.data["step"], "superseded": True} for e in previews[:-1])
    assert len(previews[-1].data["b64_json"]) == 1 and decode(previews[-1].data["b64_json"][0]).shape == (32, 32, 3)
    assert types(api, "job_1").count("job.cancelled") == 1 and types(api, "job_1")[-1] == "job.cancelled"
    assert api.redis.xpending(api.queue_key("tiny"), "workers")["pending"] == 0


def test_a_draining_worker_claims_nothing(redis_url: str, prefix: str, device: DeviceWorker) -> None:
    api = make_queue(redis_url, prefix)
    api.enqueue("job_1", request(), OutputOptions(), owner=None)
    draining = [True]
    runner = RedisJobRunner(make_queue(redis_url, prefix), device, ["tiny"], "worker-1",
                            accepting=lambda: not draining[0])
    runner.start()
    try:
        time.sleep(0.5)
        assert api.public(api.get("job_1"))["status"] == "queued" and api.stats("tiny").waiting == 1
        draining[0] = False
        assert wait_status(api, "job_1", ("succeeded", "failed"))["status"] == "succeeded"
    finally:
        runner.stop(10)


def test_a_succeeded_jobs_result_supersedes_its_previews(redis_url: str, prefix: str, device: DeviceWorker) -> None:
    api = make_queue(redis_url, prefix)
    api.enqueue("job_1", GenerationRequest.create(model="tiny", prompt="a", steps=3, seed=1, preview_every=1),
                OutputOptions(), owner=None)
    runner = RedisJobRunner(make_queue(redis_url, prefix), device, ["tiny"], "worker-1")
    runner.start()
    try:
        assert wait_status(api, "job_1", ("succeeded", "failed"))["status"] == "succeeded"
    finally:
        runner.stop(10)
    previews = [e.data for e in api.events_after("job_1") if e.type == "job.preview"]
    assert previews == [{"step": step, "superseded": True} for step in (1, 2)]  # none at the last step
    assert not api.redis.exists(f"{prefix}:prev:job_1")
