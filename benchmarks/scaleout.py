"""Scale-out benchmark: the Redis queue (API and worker processes) vs memory mode, on loopback, `shapes` at 8 steps.

    python benchmarks/scaleout.py --out benchmarks/results/scaleout_cpu.json

Every server process runs `accel-diffusion serve` with one torch thread (OMP_NUM_THREADS=1); Redis is a
`redis-server` started here (AOF on, fsync every second: the recommended setting).

(a) for memory mode (one process), 1 API + 1 worker, and 1 API + 2 workers: p50 latency of sequential
    POST /v1/images/generations (the Redis hop = its p50 minus memory mode's), then 16 concurrent clients:
    images/s and p50/p95 latency;
(b) the Redis hop with drift cancelled: memory mode and 1 API + 1 worker up at once, blocks of 5 sequential
    requests alternating between them: p50 of the Redis fleet minus p50 of memory mode, and the same for each
    request's latency minus the engine time the server reports (what serving adds beside the model);
(c) kill a worker: 1 API + 2 workers (lease_s 2), jobs submitted through POST /v1/jobs, one worker SIGKILLed
    while it runs one; every job followed to its end: completed / lost (not succeeded) / duplicated (more than
    one job.completed event), and how many jobs ran a second attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every server process: one torch thread each

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine
from serving import BODY, STEPS, free_port, load, start_server


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                "--dir", str(directory), "--logfile", ""], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sequential(port: int, count: int, overheads: list[float] | None = None) -> float:
    """p50 latency (ms) of ``count`` sequential synchronous generations on one keep-alive connection; each
    request's latency minus the engine time the server reports (``usage.compute_s``) goes to ``overheads``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps(BODY)
    latencies = []
    for index in range(count + 2):  # two warm-up requests
        begin = time.perf_counter()
        connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        assert response.status == 200, payload[:200]
        if index >= 2:
            latencies.append(time.perf_counter() - begin)
            if overheads is not None:
                overheads.append(latencies[-1] - json.loads(payload)["usage"]["compute_s"])
    connection.close()
    return 1e3 * statistics.median(latencies)


def start_fleet(url: str | None, workers: int, prefix: str, **settings: str) -> tuple[list[subprocess.Popen], int]:
    """Memory mode (``url`` None): one process. Else one API process and ``workers`` worker processes."""
    if url is None:
        port = free_port()
        return [start_server(port, queue_max=256)], port
    common = {"queue_backend": "redis", "redis_url": url, "redis_prefix": prefix, **settings}
    processes = [start_server(free_port(), queue_max=256, role="worker", worker_name=f"{prefix}-w{index}",
                              **common) for index in range(workers)]
    port = free_port()
    processes.append(start_server(port, queue_max=256, role="api", **common))
    return processes, port


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(120)


def throughput(url: str | None, workers: int, prefix: str, sequential_count: int, per_client: int) -> dict[str, Any]:
    processes, port = start_fleet(url, workers, prefix)
    try:
        row: dict[str, Any] = {"sequential_p50_ms": sequential(port, sequential_count)}
        row.update(asyncio.run(load(f"http://127.0.0.1:{port}", 16 * per_client, 16)))
    finally:
        stop(processes)
    return row


def hop(url: str, blocks: int, block: int = 5) -> dict[str, Any]:
    """The Redis hop with drift cancelled: memory mode and 1 API + 1 worker up at once (idle ones take no CPU),
    sequential requests alternating between them in blocks of ``block``."""
    memory, memory_port = start_fleet(None, 0, "")
    fleet, redis_port = start_fleet(url, 1, "hop")
    try:
        latencies: dict[str, list[float]] = {"memory": [], "redis": []}
        overheads: dict[str, list[float]] = {"memory": [], "redis": []}
        for _ in range(blocks):
            for name, port in (("memory", memory_port), ("redis", redis_port)):
                latencies[name].append(sequential(port, block, overheads[name]))
                time.sleep(0.5)
    finally:
        stop(memory + fleet)
    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    beside = {name: 1e3 * statistics.median(values) for name, values in overheads.items()}
    return {"blocks": blocks, "block": block, "memory_p50_ms": p50["memory"], "redis_p50_ms": p50["redis"],
            "redis_hop_p50_ms": p50["redis"] - p50["memory"], "block_p50s_ms": latencies,
            "latency_minus_compute_p50_ms": beside,
            "redis_hop_beside_compute_p50_ms": beside["redis"] - beside["memory"]}


def kill_a_worker(url: str, jobs: int) -> dict[str, Any]:
    processes, port = start_fleet(url, 2, "kill", lease_s="2", key_max_queued_jobs=str(jobs))
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            created = [client.post("/v1/jobs", json={**BODY, "seed": index}) for index in range(jobs)]
            assert all(r.status_code == 202 for r in created), [r.text for r in created if r.status_code != 202]
            ids = [r.json()["id"] for r in created]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # kill worker 0 once it runs a job and a few have completed
                done = sum(client.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids)
                if done >= 3:
                    break
                time.sleep(0.1)
            processes[0].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            finals = [client.get(f"/v1/jobs/{i}", params={"wait": 60}).json() for i in ids]
            completed_events, second_attempts = [], 0
            for job_id in ids:
                text = client.get(f"/v1/jobs/{job_id}/events").text
                events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
                completed_events.append(events.count("job.completed"))
                second_attempts += events.count("job.started") > 1
        statuses = [job["status"] for job in finals]
        return {"jobs": jobs, "completed": statuses.count("succeeded"),
                "lost": sum(status != "succeeded" for status in statuses),
                "duplicated": sum(count > 1 for count in completed_events), "second_attempts": second_attempts,
                "all_done_s_after_kill": time.monotonic() - killed_at, "lease_s": 2}
    finally:
        stop(processes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/scaleout_cpu.json")
    parser.add_argument("--sequential", type=int, default=20, help="sequential requests per configuration")
    parser.add_argument("--per-client", type=int, default=4, help="requests per client (16 clients)")
    parser.add_argument("--kill-jobs", type=int, default=24)
    parser.add_argument("--hop-blocks", type=int, default=6, help="alternating blocks of 5 sequential requests")
    parser.add_argument("--parts", default="throughput,hop,kill", help="comma-separated: throughput, hop, kill")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="scaleout-redis-"))
    redis_process, url = start_redis(directory)
    result: dict[str, Any] = {"benchmark": "scaleout", "model": "shapes", "steps": STEPS, "machine": machine(),
                              "torch_threads_per_process": 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, value: Any) -> None:  # each part as it ends: a later failure keeps the earlier ones
        result[name] = value
        Path(args.out).write_text(json.dumps(result, indent=1, default=float))

    parts = args.parts.split(",")
    try:
        if "throughput" in parts:
            save("memory", throughput(None, 0, "", args.sequential, args.per_client))
            save("redis_1_api_1_worker", throughput(url, 1, "one", args.sequential, args.per_client))
            save("redis_1_api_2_workers", throughput(url, 2, "two", args.sequential, args.per_client))
            save("redis_hop_p50_ms", result["redis_1_api_1_worker"]["sequential_p50_ms"]
                 - result["memory"]["sequential_p50_ms"])
        if "hop" in parts:
            save("hop", hop(url, args.hop_blocks))
        if "kill" in parts:
            save("kill_a_worker", kill_a_worker(url, args.kill_jobs))
    finally:
        redis_process.terminate()
        redis_process.wait(30)
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
