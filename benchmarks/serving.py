"""Serving benchmark on the built-in `shapes` model (8 steps), server in its own process.

    python benchmarks/serving.py --out benchmarks/results/serving_cpu.json

(a) overhead: p50 latency of sequential POST /v1/images/generations (stdlib http.client, one
    keep-alive connection) minus p50 of the same request straight through the engine in this process
    with the server's batch_invariant setting. The two alternate in blocks of 10 with a pause
    between blocks, so that neither runs while the other's OpenMP threads still spin, and drift hits
    both alike. Also: p50 of (HTTP latency - the engine time the server measured for the job), and
    the engine without batch invariance (what the mode costs a lone request);
(b) batching: images/s of 16 concurrent clients (10 requests each) with max_batch_size 16 and
    max_batch_wait_ms 50 vs max_batch_size 1, each on a fresh server, batch-invariant (the default);
    and batching on without batch invariance (images then agree with their lone runs only to float
    rounding);
(c) load: 1000 requests from 64 concurrent clients against queue_max 32: status codes (no 5xx; the
    excess gets 429), p50/p95/p99 latency of the served ones, images/s, and the server's resident
    memory after warm-up vs after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

STEPS = 8
BODY = {"prompt": "a red circle on a blue background", "seed": 0, "num_inference_steps": STEPS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, queue_max: int, max_batch_size: int = 1, max_batch_wait_ms: float = 0,
                 batch_invariant: bool = True, ready_timeout_s: float = 180, log: Any = subprocess.DEVNULL,
                 entry: list[str] | None = None, **settings: str | None) -> subprocess.Popen:
    """``accel-diffusion serve`` in its own process; ``settings``: further server settings (as env; None:
    left unset). Eager unless ``engine_acceleration`` is given (None: the server's default, compile on a CPU),
    so that the eager rows measure what they always did; ``log``: where its output goes; ``entry``: the
    Python arguments that run the CLI (default: ``accel_diffusion.cli.main``), followed by ``serve``."""
    chosen = {"engine_acceleration": "none", **settings}
    env = {k: v for k, v in os.environ.items() if k != "ACCEL_DIFFUSION_ENGINE_ACCELERATION"}
    env |= {**{f"ACCEL_DIFFUSION_{k.upper()}": v for k, v in chosen.items() if v is not None},
            "ACCEL_DIFFUSION_QUEUE_MAX": str(queue_max),
            "ACCEL_DIFFUSION_MAX_BATCH_SIZE": str(max_batch_size),
            "ACCEL_DIFFUSION_MAX_BATCH_WAIT_MS": str(max_batch_wait_ms),
            "ACCEL_DIFFUSION_BATCH_INVARIANT": str(batch_invariant).lower()}
    entry = entry or ["-c", "from accel_diffusion.cli import main; main()"]
    command = [sys.executable, *entry, "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("server did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RawConnection:
    """A keep-alive HTTP/1.1 client on a plain socket, as a load generator in C (wrk, ab) is: the request's bytes
    made once, the response read up to its Content-Length with no header parsing beyond that. Python's
    http.client builds each request and parses each response's headers with the email parser: on a 2-core VM,
    whose idle vCPU loses its caches while the engine runs, that client-side work is a measurable part of the
    time from send to received, and none of it is the server's."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self.port = port
        self.request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=120)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def post(self) -> tuple[int, bytes]:
        """Send the request; (status, body) of the response."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        while len(body) < int(length.group(1)):
            body += self.sock.recv(262144)
        return int(head[9:12]), body


def post_images(connection: http.client.HTTPConnection | RawConnection, body: str) -> tuple[int, bytes]:
    """POST ``body`` to the images route over ``connection`` (a RawConnection sends the bytes it was made with);
    (status, response body)."""
    if isinstance(connection, RawConnection):
        return connection.post()
    connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def overhead(port: int, blocks: int, block: int = 10, engine: Any = None) -> dict[str, Any]:
    """``engine``: the direct path (default: an eager Engine; the compiled rows pass a compiled one). Each block
    of HTTP requests from Python's http.client is followed by one from a plain socket (RawConnection): the
    ``raw_`` figures, without the client library's own time."""
    engine = engine or Engine(ModelRegistry.default())
    request = GenerationRequest.create(model="shapes", prompt=BODY["prompt"], seed=0, steps=STEPS)
    body = json.dumps(BODY)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    raw = RawConnection(port, "/v1/images/generations", body.encode())

    def post(client: http.client.HTTPConnection | RawConnection = connection) -> dict[str, Any]:
        status, payload = post_images(client, body)
        assert status == 200, payload[:200]
        return json.loads(payload)

    http_s: list[float] = []
    served_s: list[float] = []
    raw_s: list[float] = []
    raw_served_s: list[float] = []
    direct_s: dict[bool, list[float]] = {True: [], False: []}
    for invariant in (True, False):
        engine.generate(request, batch_invariant=invariant)
    post()
    for _ in range(blocks):
        for invariant in (True, False):
            for _ in range(block):
                begin = time.perf_counter()
                engine.generate(request, batch_invariant=invariant)
                direct_s[invariant].append(time.perf_counter() - begin)
            time.sleep(0.5)
        for client, total_s, minus_compute_s in ((connection, http_s, served_s), (raw, raw_s, raw_served_s)):
            client.close()  # a new connection per block: the server closes one idle past its keep-alive
            client.connect()
            for _ in range(block):
                begin = time.perf_counter()
                usage = post(client)["usage"]
                total_s.append(time.perf_counter() - begin)
                minus_compute_s.append(total_s[-1] - usage["compute_s"])
            time.sleep(0.5)
    connection.close()
    raw.close()
    p50 = statistics.median
    return {"requests": len(http_s), "http_p50_ms": 1e3 * p50(http_s),
            "direct_p50_ms": 1e3 * p50(direct_s[True]),
            "overhead_ms": 1e3 * (p50(http_s) - p50(direct_s[True])),
            "http_minus_server_compute_p50_ms": 1e3 * p50(served_s),
            "raw_http_p50_ms": 1e3 * p50(raw_s), "raw_overhead_ms": 1e3 * (p50(raw_s) - p50(direct_s[True])),
            "raw_http_minus_server_compute_p50_ms": 1e3 * p50(raw_served_s),
            "direct_without_batch_invariance_p50_ms": 1e3 * p50(direct_s[False])}


async def load(base: str, total: int, concurrency: int) -> dict[str, Any]:
    codes: dict[int, int] = {}
    latencies: list[float] = []
    remaining = iter(range(total))
    begin = time.perf_counter()

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in remaining:
            start = time.perf_counter()
            response = await client.post("/v1/images/generations", json={**BODY, "seed": i})
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    wall = time.perf_counter() - begin
    lat = np.array(latencies) * 1e3
    return {"requests": total, "concurrency": concurrency, "status_codes": {str(k): v for k, v in codes.items()},
            "served": len(latencies), "wall_s": wall, "images_per_s": len(latencies) / wall,
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                           "p99": float(np.percentile(lat, 99))} if len(lat) else None}


def batching(clients: int = 16, per_client: int = 10) -> dict[str, Any]:
    rows = {}
    for label, size, wait_ms, invariant in (("off", 1, 0, True), ("on", 16, 50, True),
                                            ("on_without_batch_invariance", 16, 50, False)):
        port = free_port()
        server = start_server(port, queue_max=64, max_batch_size=size, max_batch_wait_ms=wait_ms,
                              batch_invariant=invariant)
        try:
            rows[label] = asyncio.run(load(f"http://127.0.0.1:{port}", clients * per_client, clients))
            rows[label].update(max_batch_size=size, max_batch_wait_ms=wait_ms, batch_invariant=invariant)
        finally:
            server.terminate()
            server.wait(120)
    rows["speedup"] = rows["on"]["images_per_s"] / rows["off"]["images_per_s"]
    rows["speedup_without_batch_invariance"] = (rows["on_without_batch_invariance"]["images_per_s"]
                                                / rows["off"]["images_per_s"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/serving_cpu.json")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of 10 requests for the overhead")
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    port = free_port()
    server = start_server(port, queue_max=32)
    base = f"http://127.0.0.1:{port}"
    try:
        result: dict[str, Any] = {"benchmark": "serving", "model": "shapes", "steps": STEPS, "machine": machine()}
        result["overhead"] = overhead(port, args.blocks)
        rss_before = rss_mb(server.pid)
        result["load"] = asyncio.run(load(base, args.requests, 64))
        result["load"]["rss_after_warmup_mb"] = rss_before
        result["load"]["rss_after_mb"] = rss_mb(server.pid)
        result["load"]["rss_growth_mb"] = result["load"]["rss_after_mb"] - rss_before
    finally:
        server.terminate()
        server.wait(120)
    result["batching"] = batching()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
