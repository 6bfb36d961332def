"""How the device worker shares its time between the stream lane and the job queue.

Start-time fair queuing (Goyal, Vin and Cheng, 1996) over two lanes by measured cost: each lane has a weight
(``stream_share`` and ``1 - stream_share``) and a virtual finish time that grows by the wall time of each item
it ran (a stream frame, one denoising step of a job batch) divided by its weight. The system's virtual time is
the start tag of the item run last. When both lanes have work, the one whose next item starts earlier goes (a
busy lane's next item starts at its finish time; a tie goes to the jobs), so over a busy period each gets its
share of the device's time, to within one item of each lane; a lane alone gets all of it. A lane that was idle
rejoins at the system's virtual time: it gets no credit for its idle time, and it does not wait behind the
item that just ran either, so a small job that arrives during a long stream frame runs up to a frame's worth
of its own time (at its weight) before the next frame, not one step per frame. After an idle device, both
lanes start level. The average cost per item (an exponentially weighted moving average per lane) is kept for
metrics and tests.
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
        self.system = 0.0  # the system's virtual time: the start tag of the item run last

    def next(self, stream_waiting: bool, jobs_waiting: bool) -> Lane | None:
        """The lane to run next given which have work now (None: neither)."""
        waiting: dict[Lane, bool] = {"stream": stream_waiting, "jobs": jobs_waiting}
        for lane in LANES:
            if waiting[lane] and not self._active[lane]:  # rejoins at the system's virtual time
                self.virtual[lane] = max(self.virtual[lane], self.system)
            self._active[lane] = waiting[lane]
        if stream_waiting and jobs_waiting:
            return "stream" if self.virtual["stream"] < self.virtual["jobs"] else "jobs"
        if stream_waiting:
            return "stream"
        if jobs_waiting:
            return "jobs"
        self.system = max(self.virtual.values())  # an idle device: the next busy period starts level
        return None

    def charge(self, lane: Lane, seconds: float) -> None:
        """Account ``seconds`` of device time to ``lane`` (one item: a frame, a job step)."""
        seconds = max(0.0, seconds)
        self.system = self.virtual[lane]  # the item's start tag
        self.virtual[lane] += seconds / self.weight[lane]
        self.seconds[lane] += seconds
        self.items[lane] += 1
        average = self.average[lane]
        self.average[lane] = seconds if average is None else average + self.ewma_weight * (seconds - average)
