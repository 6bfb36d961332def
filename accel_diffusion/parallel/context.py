"""What every patch layer of one runtime shares: the mode, this rank's place and the counted comm."""

from __future__ import annotations

from dataclasses import dataclass

from accel_diffusion.parallel.comm import PatchComm

# full_sync: fresh activations exchanged every step (equal to one device up to rounding);
# naive: no exchange at all, each patch is denoised as if it were a whole image (the seam baseline).
MODES = ("full_sync", "naive")


@dataclass
class PatchContext:
    mode: str
    comm: PatchComm
    active: bool = False  # the wrapped layers act as the original ones outside a runtime call

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def exchanges(self) -> bool:
        return self.mode != "naive" and self.world_size > 1
