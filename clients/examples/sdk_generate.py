"""Generate with the Python SDK, follow a job's events, and save the images.

    ACCEL_DIFFUSION_URL=http://127.0.0.1:8000 python clients/examples/sdk_generate.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

from accel_diffusion.clients import AccelClient

url = os.environ.get("ACCEL_DIFFUSION_URL", "http://127.0.0.1:8000")
out_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs"

with AccelClient(url) as client:
    model = client.models()[0]["id"]
    out = client.generate("a red circle on a blue background", model=model, n=2, seed=7, steps=4)
    print("seeds", out.seeds, "nfe", out.nfe, "compute", round(out.timings["total"], 3), "s")
    for path in out.save(out_dir, "circle"):
        print("wrote", path)

    job = client.submit("a white cross on a green background", model=model, seed=3, steps=4)
    for event in job.events():
        print(event.id, event.type, event.data.get("step", ""))
    for path in job.result(timeout=60).save(out_dir, "cross"):
        print("wrote", path)
