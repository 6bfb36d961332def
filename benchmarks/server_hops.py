"""Where a synchronous request's time goes in the server: per-hop timestamps of one request at a time.

    python benchmarks/server_hops.py --requests 40 --out benchmarks/results/server_hops_cpu.json

Starts ``accel-diffusion serve`` (in its own process, as benchmarks/serving.py does, one torch thread) with
tracing wrappers around the functions a ``POST /v1/images/generations`` passes through, and sends the
serving benchmark's request (shapes, 8 steps, CFG) over one keep-alive connection, alternating blocks of
HTTP requests with blocks of the same request straight through an Engine in this process (the
benchmark's "direct" path). Both processes read ``time.perf_counter`` (CLOCK_MONOTONIC on Linux), so the
server's timestamps and the client's fall on one time line. Per hop, the p50 over the requests:

    client send -> arrival (the ASGI app called: uvicorn read and parsed the request)
    -> validated (the body parsed and checked into a GenerationRequest)
    -> enqueued (the job in the worker's queue) -> picked up (the worker thread starts the job)
    -> engine start -> engine end (Engine.generate) -> finished (images encoded, job finished)
    -> loop woken (the waiting request's event loop runs the job's wake-up)
    -> waited (the route's wait returns) -> body sent (the JSON response handed to uvicorn)
    -> client received (the whole response read)

The wrappers cost a few microseconds a hop. ``--acceleration none`` measures the eager server.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

HOPS = ["client_send", "arrival", "validated", "enqueued", "picked_up", "engine_start", "engine_end", "to_uint8",
        "encoded", "finish_called", "finished", "loop_woken", "waited", "body_sent", "client_received"]


def serve_traced(trace_path: str, argv: list[str]) -> None:
    """Run ``accel-diffusion serve`` with the tracing wrappers in place; one JSON line per HTTP request to
    ``trace_path`` (written after its response has been sent)."""
    from accel_diffusion.server import app as app_module
    from accel_diffusion.server import jobs, schemas, worker

    from accel_diffusion.engine.engine import Engine, GenerationResult

    trace: dict[str, float] = {}
    out = open(trace_path, "a", buffering=1)  # open for the life of the process

    def stamp(name: str, func: Any, at_exit: bool = True, last: bool = False) -> Any:
        """``func`` stamping ``name`` at its entry or exit: the first call's, or with ``last`` the last one's."""
        def mark() -> None:
            if last:
                trace[name] = time.perf_counter()
            else:
                trace.setdefault(name, time.perf_counter())

        @functools.wraps(func)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not at_exit:
                mark()
            result = func(*args, **kwargs)
            if at_exit:
                mark()
            return result
        return wrapped

    def stamp_async(name: str, func: Any) -> Any:
        @functools.wraps(func)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = await func(*args, **kwargs)
            trace[name] = time.perf_counter()  # the last wait's end (a waiting request re-waits every 0.5 s)
            return result
        return wrapped

    schemas.ImageGenerationRequest.to_generation_request = stamp(  # type: ignore[method-assign]
        "validated", schemas.ImageGenerationRequest.to_generation_request)
    worker.DeviceWorker.submit = stamp("enqueued", worker.DeviceWorker.submit)  # type: ignore[method-assign]
    jobs.Job.start = stamp("picked_up", jobs.Job.start, at_exit=False)  # type: ignore[method-assign]
    Engine.generate = stamp("engine_start", stamp("engine_end", Engine.generate), at_exit=False)  # type: ignore
    GenerationResult.to_uint8 = stamp("to_uint8", GenerationResult.to_uint8)  # type: ignore[method-assign]
    worker.encode_image = stamp("encoded", worker.encode_image, last=True)
    jobs.Job.finish = stamp("finish_called", stamp("finished", jobs.Job.finish), at_exit=False)  # type: ignore
    jobs._LoopSignals.wake = stamp("loop_woken", jobs._LoopSignals.wake, at_exit=False)  # type: ignore
    jobs.Job.wait_finished = stamp_async("waited", jobs.Job.wait_finished)  # type: ignore[method-assign]
    middleware_call = app_module.RequestIdAndLimits.__call__

    async def traced_call(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/images/generations":
            await middleware_call(self, scope, receive, send)
            return
        trace.clear()
        trace["arrival"] = time.perf_counter()

        async def traced_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                trace["body_sent"] = time.perf_counter()

        await middleware_call(self, scope, receive, traced_send)
        out.write(json.dumps(trace) + "\n")

    app_module.RequestIdAndLimits.__call__ = traced_call  # type: ignore[method-assign]
    from accel_diffusion.cli import main

    sys.argv = ["accel-diffusion", *argv]
    main()


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of process ``pid``'s threads so far: its main thread (the event loop) and
    the others (the device worker, torch's, uvicorn's) together."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # ended meanwhile
            continue
        name = "event_loop_thread" if task.name == str(pid) else "other_threads"
        fields = stat[stat.rindex(")") + 2:].split()
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def measure(port: int, trace_path: Path, blocks: int, block: int, engine: Any, pid: int) -> dict[str, Any]:
    from serving import BODY, STEPS

    from accel_diffusion.strategy import GenerationRequest

    request = GenerationRequest.create(model="shapes", prompt=BODY["prompt"], seed=0, steps=STEPS)
    body = json.dumps(BODY)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    clients: list[dict[str, float]] = []
    direct: list[float] = []
    direct_cpu = 0.0
    server_cpu: dict[str, float] = {}
    compute: list[float] = []

    def post(keep: bool) -> None:
        send = time.perf_counter()
        connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
        received = time.perf_counter()
        assert response.status == 200, payload[:200]
        if keep:
            clients.append({"client_send": send, "client_received": received})
            compute.append(json.loads(payload)["usage"]["compute_s"])

    engine.generate(request, batch_invariant=True)
    post(False)
    for _ in range(blocks):
        for _ in range(block):
            begin, cpu = time.perf_counter(), time.process_time()
            engine.generate(request, batch_invariant=True)
            direct.append(time.perf_counter() - begin)
            direct_cpu += time.process_time() - cpu
        time.sleep(0.5)
        connection.close()
        connection.connect()
        before = thread_cpu_s(pid)
        for _ in range(block):
            post(True)
        for name, seconds in thread_cpu_s(pid).items():  # the server's CPU time over the block, by thread
            server_cpu[name] = server_cpu.get(name, 0.0) + seconds - before.get(name, 0.0)
        time.sleep(0.5)
    connection.close()
    traces = [json.loads(line) for line in trace_path.read_text().splitlines()][-len(clients):]
    rows = [client | server for client, server in zip(clients, traces, strict=True)]
    hops = {}
    for first, second in itertools.pairwise(HOPS):
        deltas = [1e3 * (row[second] - row[first]) for row in rows if first in row and second in row]
        hops[f"{first} -> {second}"] = statistics.median(deltas) if deltas else None
    p50 = statistics.median
    http_ms = [1e3 * (r["client_received"] - r["client_send"]) for r in rows]
    engine_ms = [1e3 * (r["engine_end"] - r["engine_start"]) for r in rows]
    outside = [h - e for h, e in zip(http_ms, engine_ms)]
    return {"requests": len(rows), "hops_p50_ms": hops, "http_p50_ms": p50(http_ms),
            "server_engine_p50_ms": p50(engine_ms), "server_engine_timings_total_p50_ms": 1e3 * p50(compute),
            "direct_engine_p50_ms": 1e3 * p50(direct),
            "overhead_ms": p50(http_ms) - 1e3 * p50(direct),  # the serving benchmark's definition
            "http_minus_server_engine_p50_ms": p50(outside),
            # CPU time per request (load-proof, unlike wall times): the server's threads vs the direct engine's
            "server_cpu_ms_per_request": {name: 1e3 * s / len(rows) for name, s in server_cpu.items() if s},
            "direct_engine_cpu_ms_per_request": 1e3 * direct_cpu / len(direct),
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="timed HTTP requests (in blocks of 10)")
    parser.add_argument("--acceleration", choices=["compile", "none"], default="compile")
    parser.add_argument("--cache-dir", default=None, help="inductor cache (warm start); default: a new one")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--serve-traced", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_traced:
        serve_traced(args.serve_traced[0], args.serve_traced[1:])
        return
    import tempfile

    os.environ["OMP_NUM_THREADS"] = "1"  # the server (its child) and this process: one torch thread each
    import torch

    torch.set_num_threads(1)
    from engine import _single_model_registry
    from serving import free_port, start_server

    from accel_diffusion.engine import Engine, compiled
    from accel_diffusion.models.registry import ModelRegistry

    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    trace_path = Path(tempfile.mkdtemp(prefix="server-hops-")) / "trace.jsonl"
    trace_path.touch()
    port = free_port()
    # buckets [1, 2]: the graphs a lone CFG request runs (UNet 2 rows, decode 1); the server warms only them
    server = start_server(port, queue_max=8, ready_timeout_s=1800, engine_acceleration=args.acceleration,
                          inductor_cache_dir=cache, compile_buckets="[1, 2]",
                          entry=[str(Path(__file__).resolve()), "--serve-traced", str(trace_path)])
    try:
        model = ModelRegistry.default().get("shapes")
        if args.acceleration == "compile":
            compiled.set_cache_dir(cache)  # the graph the server built loads from its cache
            model.compiled_model((1, 2))
            compiled.warm(model)
        engine = Engine(_single_model_registry(model), acceleration=args.acceleration, buckets=(1, 2))
        result = measure(port, trace_path, max(1, args.requests // 10), 10, engine, server.pid)
    finally:
        server.terminate()
        server.wait(120)
    result |= {"acceleration": args.acceleration, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
