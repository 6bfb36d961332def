"""How the device worker shares its time between the stream lane and the job queue.

Start-time fair queuing over two lanes by measured cost: each lane has a weight (``stream_share`` and
``1 - stream_share``) and a virtual time that grows by the wall time of each item it ran (a stream frame,
one denoising step of a job batch) divided by its weight. When both lanes have work the one with the
smaller virtual time goes next (a tie goes to the jobs), so over a busy period each gets its share of
the device's time; a lane alone gets all of it. A lane that was idle rejoins at the other's virtual time,
less at most one item's worth of credit (its average cost over its weight): a stream whose next frame
arrives a moment after the last one finished does not lose its turn, and a lane that idled for a minute
does not then hold the device for a minute. The average cost is an exponentially weighted moving
average per lane.
"""

from __future__ import annotations

from typing import Literal

Lane = Literal["stream", "jobs"]
LANES: tuple[Lane, Lane] = ("stream", "jobs")


class FairShare:
    """The two lanes' accounting and the choice of which goes next (used on the worker thread only)."""

    def __init__(self, stream_share: float = 0.5, ewma_weight: float = 0.2) -> None:
        if not 0 < stream_share < 1:
            raise ValueError(f"stream_share must be in (0, 1), got {stream_share!r}")
        self.stream_share = stream_share
        self.ewma_weight = ewma_weight
        self.weight: dict[Lane, float] = {"stream": stream_share, "jobs": 1 - stream_share}
        self.virtual: dict[Lane, float] = {"stream": 0.0, "jobs": 0.0}
        self.average: dict[Lane, float | None] = {"stream": None, "jobs": None}  # EWMA of an item's seconds
        self.seconds: dict[Lane, float] = {"stream": 0.0, "jobs": 0.0}  # all measured time, for metrics and tests
        self.items: dict[Lane, int] = {"stream": 0, "jobs": 0}
        self._active: dict[Lane, bool] = {"stream": False, "jobs": False}

    def next(self, stream_waiting: bool, jobs_waiting: bool) -> Lane | None:
        """The lane to run next given which have work now (None: neither)."""
        waiting: dict[Lane, bool] = {"stream": stream_waiting, "jobs": jobs_waiting}
        before = dict(self._active)
        latest = max(self.virtual.values())
        for lane in LANES:
            other: Lane = "jobs" if lane == "stream" else "stream"
            if waiting[lane] and not before[lane]:  # rejoins: at the running lane's time (an idle device: the latest)
                reference = self.virtual[other] if before[other] else latest
                self.virtual[lane] = max(self.virtual[lane], reference - self.credit(lane))
            self._active[lane] = waiting[lane]
        if stream_waiting and jobs_waiting:
            return "stream" if self.virtual["stream"] < self.virtual["jobs"] else "jobs"
        if stream_waiting:
            return "stream"
        return "jobs" if jobs_waiting else None

    def credit(self, lane: Lane) -> float:
        """The most virtual time a lane that rejoins may be behind the other: one item at its average cost."""
        average = self.average[lane]
        return 0.0 if average is None else average / self.weight[lane]

    def charge(self, lane: Lane, seconds: float) -> None:
        """Account ``seconds`` of device time to ``lane`` (one item: a frame, a job step)."""
        seconds = max(0.0, seconds)
        self.virtual[lane] += seconds / self.weight[lane]
        self.seconds[lane] += seconds
        self.items[lane] += 1
        average = self.average[lane]
        self.average[lane] = seconds if average is None else average + self.ewma_weight * (seconds - average)
