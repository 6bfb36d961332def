"""Job store retention (TTL and cap on finished jobs) and the job state machine."""

from __future__ import annotations

import time

from accel_diffusion.server.jobs import Job, JobStatus, JobStore

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
