"""The job store's incremental retention accounting (server/jobs.py) makes the very releases of the store that
rescanned every kept job at each prune: the rescan is kept here as the reference, and both stores see the same
random adds, finishes, image releases and clock."""

from __future__ import annotations

import random
import types
from collections import Counter, deque

import pytest
from accel_diffusion.server import jobs
from accel_diffusion.server.jobs import Job, JobStatus, JobStore

from accel_diffusion.strategy import GenerationRequest


class RescanningStore(JobStore):
    """The retention as it was: every prune rescans all the kept jobs."""

    def _changed(self, job: Job) -> None:
        pass

    def _prune(self) -> None:
        now = jobs.time.time()
        finished = [j for j in self._jobs.values() if j.status.finished]
        expired = {j.id for j in finished if j.completed_at is not None and now - j.completed_at > self.ttl_s}
        kept: dict[str | None, deque[Job]] = {}
        for job in finished:
            if job.id not in expired:
                kept.setdefault(job.owner, deque()).append(job)
        for owned in kept.values():
            while self.key_max_finished is not None and len(owned) > self.key_max_finished:
                expired.add(owned.popleft().id)
        for _ in range(max(0, sum(len(owned) for owned in kept.values()) - self.max_finished)):
            expired.add(max(kept.values(), key=len).popleft().id)
        for job_id in expired:
            del self._jobs[job_id]
        held: Counter[str | None] = Counter()
        for job in self._jobs.values():
            held[job.owner] += job.image_bytes
        holding: dict[str | None, deque[Job]] = {}
        for job in sorted(self._jobs.values(), key=lambda j: j.completed_at or 0.0):
            if job.image_bytes and not job.delivered_by_caller:
                holding.setdefault(job.owner, deque()).append(job)

        def release(owner: str | None) -> None:
            job = holding[owner].popleft()
            held[owner] -= job.image_bytes
            job.release_images()
            if not holding[owner]:
                del holding[owner]

        if self.key_max_image_bytes is not None:
            for owner in list(holding):
                while owner in holding and held[owner] > self.key_max_image_bytes:
                    release(owner)
        while self.max_image_bytes is not None and holding and held.total() > self.max_image_bytes:
            release(max(holding, key=lambda owner: held[owner]))


@pytest.mark.parametrize("seed", range(12))
def test_the_incremental_retention_releases_what_a_rescan_releases(seed: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    clock = [1000.0]
    monkeypatch.setattr(jobs, "time", types.SimpleNamespace(time=lambda: clock[0]))
    caps = {"ttl_s": 60, "max_finished": rng.choice([3, 8, 20]), "max_image_bytes": rng.choice([None, 0, 400, 900]),
            "key_max_finished": rng.choice([None, 2, 5]), "key_max_image_bytes": rng.choice([None, 150, 300])}
    stores = (JobStore(**caps), RescanningStore(**caps))  # type: ignore[arg-type]
    pairs: list[tuple[Job, Job]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not pairs:
            owner, delivered = rng.choice([None, "alice", "bob", "carol"]), rng.random() < 0.1
            pair = tuple(Job(request=GenerationRequest.create(model="tiny", prompt="a"), owner=owner,
                             delivered_by_caller=delivered) for _ in stores)
            for store, job in zip(stores, pair, strict=True):
                store.add(job)
            pairs.append(pair)  # type: ignore[arg-type]
        elif op < 0.65:
            pair = rng.choice(pairs)
            status = rng.choice([JobStatus.SUCCEEDED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
            chars = rng.choice([0, 40, 100, 250])
            result = {"images": [{"seed": 1, "b64_json": "A" * chars}]} if status is JobStatus.SUCCEEDED else None
            preview = rng.random() < 0.3
            for job in pair:
                if preview and not job.status.finished:
                    job.emit("job.preview", {"step": 1, "b64_json": ["P" * 30]})
                job.finish(status, result=result)
        elif op < 0.7:
            for job in rng.choice(pairs):
                job.release_images()  # a synchronous caller delivered them
        elif op < 0.85:
            clock[0] += rng.choice([0.0, 0.0, 1.0, 7.0, 25.0])
        for store in stores:
            store.get("job_none")  # a prune
        kept = [[pairs_index[j.id] for j in store.all()] for store, pairs_index in zip(stores, (
            {a.id: k for k, (a, _) in enumerate(pairs)}, {b.id: k for k, (_, b) in enumerate(pairs)}), strict=True)]
        assert kept[0] == kept[1]
        assert [a.image_bytes for a, _ in pairs] == [b.image_bytes for _, b in pairs]
    store = stores[0]  # the entries of jobs gone do not pile up
    entries = len(store._by_completion) + sum(map(len, store._oldest.values())) + sum(map(len, store._images.values()))
    assert entries <= 6 * len(store._held) + 64 + 3
