"""What every patch layer of one runtime shares: the mode, this rank's place, the step and the counted comm."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from accel_diffusion.parallel.comm import PatchComm

# full_sync: fresh activations exchanged every step (equal to one device up to rounding);
# distrifusion: displaced patch parallelism, activations stale by one step exchanged asynchronously after
#   ``warmup_steps`` synchronous steps, corrected GroupNorm statistics, cached cross-attention K/V;
# pcpp: like distrifusion, but each patch conditions only on the ``rho`` fraction of each neighbour's rows
#   nearest it, exchanged point to point with its two neighbours;
# naive: no exchange at all, each patch is denoised as if it were a whole image (the seam baseline).
MODES = ("full_sync", "distrifusion", "pcpp", "naive")


@dataclass
class PatchContext:
    mode: str
    comm: PatchComm
    warmup_steps: int = 4
    rho: float = 0.5
    active: bool = False  # the wrapped layers act as the original ones outside a runtime call
    step: int = 0  # the UNet call of this generation
    local_rows: int = 0  # latent rows of this rank in the current call
    latent_width: int = 0
    # P2P tags, one per exchanging layer, numbered in the UNet's module order: the same on every rank
    tags: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def exchanges(self) -> bool:
        return self.mode != "naive" and self.world_size > 1

    @property
    def synchronous(self) -> bool:
        """This step exchanges fresh activations and waits for them (full_sync, or a warm-up step:
        DistriFusion's ``counter <= warmup_steps``, i.e. step 0 and ``warmup_steps`` more)."""
        return self.mode == "full_sync" or self.step <= self.warmup_steps

    def level_width(self, local_tokens: int) -> int:
        """The width of the feature map whose patch has ``local_tokens`` tokens (every level halves both
        sides of the latent's patch)."""
        scale = round((self.local_rows * self.latent_width / local_tokens) ** 0.5)
        return self.latent_width // scale
