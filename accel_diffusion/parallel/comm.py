"""Counted communication for patch parallelism: every exchange goes through ``PatchComm``, which
records the bytes each rank sends and receives in a ``CommStats``, per denoising step and per kind.

Bytes are *logical* volumes, the data a direct exchange moves, independent of the collective's
algorithm (a ring all-gather relays more through intermediate ranks; gloo and NCCL pick their own):

- ``all_gather`` of an n-byte tensor over N ranks: each rank sends its n bytes to N - 1 peers and
  receives N - 1 tensors of n bytes: (N - 1) n sent and (N - 1) n received.
- ``exchange_neighbours`` (point-to-point): exactly the tensors sent to and received from rank - 1
  and rank + 1.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

KINDS = ("conv_halo", "attention_kv", "norm_stats", "output_gather")


class CommStats:
    """Bytes sent and received by one rank, per step (UNet call of a generation) and per kind."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self._sent: dict[tuple[int, str], int] = defaultdict(int)
        self._received: dict[tuple[int, str], int] = defaultdict(int)

    def reset(self) -> None:
        self.step = 0
        self._sent.clear()
        self._received.clear()

    def add(self, kind: str, sent: int, received: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown communication kind {kind!r}; one of {KINDS}")
        self._sent[(self.step, kind)] += sent
        self._received[(self.step, kind)] += received

    @property
    def steps(self) -> int:
        """Steps that moved any byte, counted up to the last one that did (0 when none did)."""
        keys = list(self._sent) + list(self._received)
        return max((step for step, _ in keys), default=-1) + 1

    def sent(self, kind: str | None = None, step: int | None = None) -> int:
        return _total(self._sent, kind, step)

    def received(self, kind: str | None = None, step: int | None = None) -> int:
        return _total(self._received, kind, step)

    def summary(self) -> dict[str, Any]:
        """JSON-safe totals per kind and the per-step breakdown."""
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": self.steps,
            "bytes_sent": {kind: self.sent(kind) for kind in KINDS},
            "bytes_received": {kind: self.received(kind) for kind in KINDS},
            "per_step": [
                {
                    "step": step,
                    "sent": {kind: self.sent(kind, step) for kind in KINDS},
                    "received": {kind: self.received(kind, step) for kind in KINDS},
                }
                for step in range(self.steps)
            ],
        }


def _total(table: dict[tuple[int, str], int], kind: str | None, step: int | None) -> int:
    return sum(v for (s, k), v in table.items() if (kind is None or k == kind) and (step is None or s == step))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class PatchComm:
    """The collectives the patch layers use, on ``group`` (the default group when None), counted."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("patch parallelism needs torch.distributed initialised (init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats(self.rank, self.world_size)

    def all_gather(self, tensor: torch.Tensor, kind: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order; synchronous."""
        tensor = tensor.contiguous()
        if self.world_size == 1:
            return [tensor]
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        volume = _nbytes(tensor) * (self.world_size - 1)
        self.stats.add(kind, sent=volume, received=volume)
        return parts

    def all_gather_async(self, tensor: torch.Tensor, kind: str) -> tuple[list[torch.Tensor], dist.Work | None]:
        """Start an all-gather; the parts are valid once the returned work (None on one rank) is waited on."""
        tensor = tensor.contiguous()
        if self.world_size == 1:
            return [tensor], None
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = dist.all_gather(parts, tensor, group=self.group, async_op=True)
        volume = _nbytes(tensor) * (self.world_size - 1)
        self.stats.add(kind, sent=volume, received=volume)
        return parts, work

    def exchange_neighbours(self, to_above: torch.Tensor, to_below: torch.Tensor, kind: str, tag: int,
                            ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[dist.Work]]:
        """Send ``to_above`` to rank - 1 and ``to_below`` to rank + 1; receive rank - 1's ``to_below`` and
        rank + 1's ``to_above`` (None past the image's edges). Point to point, started, not waited on."""
        works: list[dist.Work] = []
        from_above = from_below = None
        sent = 0
        if self.rank > 0:
            peer = dist.get_global_rank(self.group, self.rank - 1) if self.group is not None else self.rank - 1
            to_above = to_above.contiguous()
            from_above = torch.empty_like(to_below)  # every rank's pieces have the same shapes
            works += [dist.isend(to_above, peer, group=self.group, tag=tag),
                      dist.irecv(from_above, peer, group=self.group, tag=tag)]
            sent += _nbytes(to_above)
        if self.rank < self.world_size - 1:
            peer = dist.get_global_rank(self.group, self.rank + 1) if self.group is not None else self.rank + 1
            to_below = to_below.contiguous()
            from_below = torch.empty_like(to_above)
            works += [dist.isend(to_below, peer, group=self.group, tag=tag),
                      dist.irecv(from_below, peer, group=self.group, tag=tag)]
            sent += _nbytes(to_below)
        received = sum(_nbytes(t) for t in (from_above, from_below) if t is not None)
        self.stats.add(kind, sent=sent, received=received)
        return from_above, from_below, works
