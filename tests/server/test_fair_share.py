"""The device worker shares its time between stream frames and jobs by measured cost (FairShare)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from accel_diffusion.server.fair_share import FairShare
from accel_diffusion.server.jobs import Job, JobStatus
from accel_diffusion.server.metrics import ServerMetrics
from accel_diffusion.server.worker import DeviceWorker

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8])
def test_two_busy_lanes_split_the_time_by_the_share(share: float) -> None:
    """Frames of 3 s, job steps of 0.2 s (charged as measured): over 600 s the stream gets its share, to one frame."""
    fair = FairShare(share)
    cost = {"stream": 3.0, "jobs": 0.2}
    runs = {"stream": 0, "jobs": 0}
    while sum(fair.seconds.values()) < 600:
        lane = fair.next(True, True)
        assert lane is not None
        fair.charge(lane, cost[lane])
        runs[lane] += 1
    assert abs(fair.seconds["stream"] / sum(fair.seconds.values()) - share) <= 3.0 / 600 + 1e-9
    assert fair.items == runs and fair.average == cost  # the EWMA of a constant cost is that cost


def test_a_lane_alone_gets_all_the_time_and_rejoins_at_the_system_virtual_time() -> None:
    fair = FairShare(0.5)
    for _ in range(100):  # jobs alone for 100 s: the stream lane has no work
        assert fair.next(False, True) == "jobs"
        fair.charge("jobs", 1.0)
    assert fair.seconds == {"stream": 0.0, "jobs": 100.0}
    # the stream rejoins at the start of the job step run last: the next turn, then one each, not 100 s of frames
    order = []
    for _ in range(7):
        lane = fair.next(True, True)
        assert lane is not None
        fair.charge(lane, 1.0)
        order.append(lane)
    assert order == ["stream", "jobs", "stream", "jobs", "stream", "jobs", "stream"]
    # the stream pauses for a moment (its next frame not yet sent): it keeps its own finish time, no credit
    for _ in range(5):
        assert fair.next(False, True) == "jobs"
        fair.charge("jobs", 1.0)
    assert [_run(fair, 1.0) for _ in range(4)] == ["stream", "jobs", "stream", "jobs"]


def _run(fair: FairShare, seconds: float) -> str:
    lane = fair.next(True, True)
    assert lane is not None
    fair.charge(lane, seconds)
    return lane


def test_a_small_job_arriving_during_a_long_frame_runs_its_steps_before_the_next_frame() -> None:
    """Frames of 2 s, a 10-step job of 0.02 s a step: the job rejoins at the frame's start tag and so gets up
    to a frame's worth of time (at equal weights) before the next frame. Rejoining at the frame's finish
    (the first version) gave it one or two steps per frame: a 10-step job took 5 frames."""
    fair = FairShare(0.5)
    for _ in range(3):
        assert fair.next(True, False) == "stream"
        fair.charge("stream", 2.0)
    order = []
    for _ in range(10):
        lane = fair.next(True, True)
        assert lane is not None
        fair.charge(lane, 2.0 if lane == "stream" else 0.02)
        order.append(lane)
    assert order == ["jobs"] * 10
    steps = 10
    while fair.next(True, True) == "jobs":  # a long job: a frame's worth of steps (2 s / 0.02 s) before a frame
        fair.charge("jobs", 0.02)
        steps += 1
    assert steps in (100, 101)  # (a tie goes to the jobs; float rounding decides the 100th)


def test_an_idle_device_gives_no_lane_its_past_idle_time_as_credit() -> None:
    fair = FairShare(0.5)
    for _ in range(50):
        fair.next(False, True)
        fair.charge("jobs", 1.0)
    assert fair.next(False, False) is None  # idle; then both lanes get work at once
    runs = []
    for _ in range(4):
        lane = fair.next(True, True)
        assert lane is not None
        fair.charge(lane, 1.0)
        runs.append(lane)
    assert runs.count("stream") == 2


def test_the_share_must_leave_both_lanes_time() -> None:
    with pytest.raises(ValueError, match="stream_share"):
        FairShare(1.0)


def _worker(models_file: Path, share: float) -> DeviceWorker:
    return DeviceWorker(Engine(ModelRegistry.from_file(models_file)), queue_max=4, metrics=ServerMetrics(),
                        stream_share=share)


class _Stream:
    """One stream session as the server drives it: one frame in flight, the next sent when it is done."""

    def __init__(self, worker: DeviceWorker, frame_s: float) -> None:
        self.worker, self.frame_s = worker, frame_s
        self.started: list[float] = []  # when each frame began on the worker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def frame(self) -> None:
        self.started.append(time.perf_counter())
        time.sleep(self.frame_s)  # a frame of known cost (the worker measures its wall time)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.worker.run_soon(self.frame).result()


def test_a_stream_gets_its_share_of_the_worker_while_a_real_job_runs(tiny_models_file: Path) -> None:
    """A real tiny-pipeline job of 60 steps and a stream whose frames cost 20 ms: between the job's 10th
    and 50th step the measured split is the configured share (to 0.12)."""
    share = 0.3
    worker = _worker(tiny_models_file, share)
    snapshots: list[dict[str, float]] = []

    class MeasuredJob(Job):
        def progress(self, step: int, total: int) -> None:
            super().progress(step, total)
            if step in (10, 50):
                snapshots.append(dict(worker.fair_share.seconds))

    job = MeasuredJob(request=GenerationRequest.create(model="tiny", prompt="a", steps=60))
    stream = _Stream(worker, 0.02)
    worker.start()
    try:
        stream.thread.start()
        time.sleep(0.1)
        worker.submit(job)
        assert _wait(job, 120)
    finally:
        stream.stop.set()
        stream.thread.join()
        worker.stop(timeout=60)
    assert job.status is JobStatus.SUCCEEDED and len(snapshots) == 2
    stream_s = snapshots[1]["stream"] - snapshots[0]["stream"]
    jobs_s = snapshots[1]["jobs"] - snapshots[0]["jobs"]
    assert abs(stream_s / (stream_s + jobs_s) - share) < 0.12, (stream_s, jobs_s)


def _wait(job: Job, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not job.status.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    return job.status.finished


def test_a_small_job_waits_for_at_most_the_frame_in_flight_while_streams_flood(tiny_models_file: Path) -> None:
    """Two streams of 0.4 s frames: with a share of 0.5 the job's turns match the frames' time, so the
    frames that start while it runs are those its own measured time buys (seconds / 0.4 s) plus the
    one a turn boundary rounds up, and one more for the frame the other stream had waiting: the old
    worker ran both streams' waiting frames before each of its 10 steps (20 frames)."""
    frame_s = 0.4
    worker = _worker(tiny_models_file, 0.5)
    streams = [_Stream(worker, frame_s) for _ in range(2)]
    warm = Job(request=GenerationRequest.create(model="tiny", prompt="a", steps=10))
    job = Job(request=GenerationRequest.create(model="tiny", prompt="a", steps=10))
    worker.start()
    try:
        worker.submit(warm)  # the first job pays the engine's one-time costs
        assert _wait(warm, 120)
        for stream in streams:
            stream.thread.start()
        time.sleep(1.0)
        jobs_before = worker.fair_share.seconds["jobs"]
        submitted = time.perf_counter()
        worker.submit(job)
        assert _wait(job, 120)
        finished = time.perf_counter()
        job_s = worker.fair_share.seconds["jobs"] - jobs_before
    finally:
        for stream in streams:
            stream.stop.set()
        for stream in streams:
            stream.thread.join()
        worker.stop(timeout=60)
    assert job.status is JobStatus.SUCCEEDED
    during = [t for stream in streams for t in stream.started if submitted < t < finished]
    assert len(during) <= job_s / frame_s + 2, (len(during), job_s)
    assert len(during) < 20
    assert finished - submitted <= 2 * job_s + 3 * frame_s + 0.5  # 2x its own time, the frame in flight, rounding
