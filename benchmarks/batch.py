"""Batch-job benchmark: 256 prompts on the built-in `shapes` model at 8 steps.

    python benchmarks/batch.py --out benchmarks/results/batch_cpu.json

Images/s of (1) the engine called directly in a loop (no files), (2) `accel-diffusion batch --local`
(run_batch with the local backend: engine + PNG files + records), and (3) the same manifest through
a server (its own process, default settings: batch-invariant, no cross-request batching) at
concurrency 1, 4 and 16; each ratio to (2) and to (1). Every run writes into a fresh folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine
from serving import free_port, start_server

from accel_diffusion.batch import LocalBackend, ServerBackend, run_batch
from accel_diffusion.batch.manifest import read_manifest

STEPS = 8
SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "black"]


def write_manifest(path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        shape, colour, background = SHAPES[i % 4], COLOURS[i % 8], COLOURS[(i // 8 + 3) % 8]
        lines.append(json.dumps({"prompt": f"a {colour} {shape} on a {background} background", "seed": i,
                                 "steps": STEPS}))
    path.write_text("\n".join(lines) + "\n")
    return path


def direct(manifest: Path, backend: LocalBackend) -> dict[str, Any]:
    planned, _ = read_manifest(manifest, backend.default_model())
    begin = time.perf_counter()
    images = 0
    for p in planned:
        images += len(backend.engine.generate(p.generation_request(), batch_invariant=True).images)
    wall = time.perf_counter() - begin
    return {"images": images, "wall_s": wall, "images_per_s": images / wall}


def batch_run(manifest: Path, backend: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        report = run_batch(manifest, out, backend, progress=False)
    assert report.ok and report.generated == report.requests, report.errors[:3]
    return {"images": report.images, "wall_s": report.wall_s, "images_per_s": report.images_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/batch_cpu.json")
    parser.add_argument("--requests", type=int, default=256)
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "batch", "model": "shapes", "steps": STEPS, "requests": args.requests,
                              "machine": machine()}
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_manifest(Path(folder) / "manifest.jsonl", args.requests)
        local = LocalBackend()
        local.engine.generate(read_manifest(manifest, "shapes")[0][0].generation_request(), batch_invariant=True)
        result["direct"] = direct(manifest, local)
        result["local"] = batch_run(manifest, local)
        del local
        port = free_port()
        server = start_server(port, queue_max=64)
        try:
            for concurrency in (1, 4, 16):
                backend = ServerBackend(f"http://127.0.0.1:{port}", concurrency)
                try:
                    result[f"server_c{concurrency}"] = batch_run(manifest, backend)
                finally:
                    backend.close()
        finally:
            server.terminate()
            server.wait(120)
    for key in ("local", "server_c1", "server_c4", "server_c16"):
        result[key]["ratio_to_local"] = result[key]["images_per_s"] / result["local"]["images_per_s"]
        result[key]["ratio_to_direct"] = result[key]["images_per_s"] / result["direct"]["images_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
