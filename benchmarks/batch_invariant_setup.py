"""Per-call set-up of the batch-invariant mode (``BatchInvariantOps`` + ``batch_invariant_attention``) on `shapes`:
the per-model swap as the engine runs it, against the swap worked out again at every call (a module-tree walk per
model, as before the cache), alternating in one process.

    python benchmarks/batch_invariant_setup.py --pairs 2000   # ~10 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from accel_diffusion.engine import attention
from accel_diffusion.engine.batch_invariance import BatchInvariantOps
from accel_diffusion.models.registry import ModelRegistry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = ModelRegistry.default().get("shapes")
    modules = [m for m in (getattr(model.pipeline, "unet", None), getattr(model.pipeline, "vae", None),
                           model.tiny_vae) if m is not None]

    def setup(cached: bool) -> float:
        if not cached:
            attention._SWAPS.clear()  # the swap worked out again: what every call did before the cache
        begin = time.perf_counter()
        with torch.no_grad(), BatchInvariantOps(), attention.batch_invariant_attention(modules):
            pass
        return time.perf_counter() - begin

    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.pairs):
        for cached in (False, True):
            times[cached].append(setup(cached))
    print(f"load average {os.getloadavg()[0]:.2f}, {args.pairs} pairs, one torch thread")
    for cached, label in ((False, "walked every call"), (True, "per-model swap")):
        values = times[cached]
        print(f"{label}: median {statistics.median(values) * 1e3:.3f} ms, "
              f"p90 {statistics.quantiles(values, n=10)[-1] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
