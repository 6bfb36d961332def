"""The job store's retention work per request at the server's defaults (TTL 1 h, 1000 finished jobs kept, 250 per
key, image caps 1 GiB / 256 MiB): the store as it is (incremental accounting) against the store that rescanned
every kept job at each prune (the reference of tests/server/test_job_retention.py), alternating blocks in one
process, after filling both with ``--kept`` finished jobs of 4 keys.

    python benchmarks/job_store_prune.py --kept 1000 --requests 2000   # ~15 s

One "request" is what the synchronous route does to the store: add the job (a prune), finish it with one image
of 20 000 base64 characters, get it (a prune), the caller's release of its images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from accel_diffusion.server.jobs import Job, JobStatus, JobStore

from accel_diffusion.strategy import GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from test_job_retention import RescanningStore

DEFAULTS = {"ttl_s": 3600.0, "max_finished": 1000, "max_image_bytes": 1 << 30, "key_max_finished": 250,
            "key_max_image_bytes": 256 << 20}
OWNERS = ["key-a", "key-b", "key-c", "key-d"]
REQUEST = GenerationRequest.create(model="shapes", prompt="a red circle")
RESULT = {"images": [{"seed": 1, "b64_json": "A" * 20_000}]}


def request(store: JobStore, k: int, delivered: bool) -> float:
    begin = time.perf_counter()
    job = Job(request=REQUEST, owner=OWNERS[k % len(OWNERS)], delivered_by_caller=delivered)
    store.add(job)
    job.finish(JobStatus.SUCCEEDED, result=RESULT)
    store.get(job.id)
    if delivered:
        job.release_images()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kept", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--block", type=int, default=50)
    args = parser.parse_args()
    stores = {"incremental": JobStore(**DEFAULTS), "rescan": RescanningStore(**DEFAULTS)}  # type: ignore[arg-type]
    for store in stores.values():
        for k in range(args.kept):
            request(store, k, delivered=False)
    times: dict[str, list[float]] = {name: [] for name in stores}
    for block in range(args.requests // args.block):
        for name, store in stores.items():
            for k in range(args.block):
                times[name].append(request(store, block * args.block + k, delivered=True))
    kept = {name: len(store.all()) for name, store in stores.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; finished jobs kept {kept}")
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1e3:.3f} ms per request, "
              f"p90 {statistics.quantiles(values, n=10)[-1] * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
