"""One layer's exchange across the steps of a generation: fresh, or displaced by one step.

On a synchronous step (``full_sync``, a warm-up step, or the first step after the batch changed) the
exchange runs and is waited on: every piece is fresh. On a displaced step (DistriFusion's idea, also
PCPP's) the layer uses the pieces its peers published at this layer one step earlier, and publishes
this step's fresh pieces asynchronously, to be waited on at the same layer in the next step, so the
transfer overlaps the rest of this step's compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from accel_diffusion.parallel.context import PatchContext


class Exchange:
    def __init__(self, context: PatchContext, kind: str) -> None:
        self.context = context
        self.kind = kind
        self.tag = next(context.tags)  # point-to-point messages of different layers never pair up
        self._pending: object = None  # what the works in flight fill in
        self._works: list[dist.Work] = []
        self._stale: object = None
        self._shape: torch.Size | None = None
        self.fresh = True  # whether the last call's pieces were this step's

    def reset(self) -> None:
        """Drain what is in flight and forget the stale pieces (a new generation starts synchronously)."""
        self._wait()
        self._stale = None
        self._shape = None

    def _wait(self) -> None:
        for work in self._works:
            work.wait()
        if self._works or self._pending is not None:
            self._stale = self._pending
        self._works, self._pending = [], None

    def _displaced(self, shape: torch.Size) -> bool:
        """Whether this step uses last step's pieces: not when synchronous, nor when the shape changed."""
        self._wait()
        displaced = not self.context.synchronous and self._stale is not None and self._shape == shape
        self._shape = shape
        self.fresh = not displaced
        return displaced

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor``, in rank order: this step's (synchronous) or last step's (displaced;
        this rank's own slot too: the caller puts its fresh tensor in where it wants it)."""
        comm = self.context.comm
        if not self._displaced(tensor.shape):
            parts = comm.all_gather(tensor, self.kind)
            self._stale = parts
            return parts
        stale = self._stale
        self._pending, work = comm.all_gather_async(tensor, self.kind)
        self._works = [work] if work is not None else []
        return stale  # type: ignore[return-value]

    def neighbours(self, to_above: torch.Tensor, to_below: torch.Tensor,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(rank - 1's ``to_below``, rank + 1's ``to_above``), this step's or last step's; None past the edges."""
        comm = self.context.comm
        displaced = self._displaced(torch.Size([*to_above.shape, *to_below.shape]))
        from_above, from_below, works = comm.exchange_neighbours(to_above, to_below, self.kind, self.tag)
        if not displaced:
            for work in works:
                work.wait()
            self._stale = (from_above, from_below)
            return from_above, from_below
        stale = self._stale
        self._pending, self._works = (from_above, from_below), works
        return stale  # type: ignore[return-value]
