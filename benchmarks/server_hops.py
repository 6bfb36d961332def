"""Where a synchronous request's time goes in the server: per-hop timestamps of one request at a time.

    python benchmarks/server_hops.py --requests 40 --compare-pool-dependencies --cache-dir <a warm inductor cache> \
        --out benchmarks/results/server_hops_cpu.json

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

Also the server's CPU time per request by thread (from /proc; unlike the wall times, load does not inflate it)
against the direct engine's. ``--compare-pool-dependencies`` runs a second server beside it, in the same
blocks, whose route dependencies are plain functions that FastAPI runs in its thread pool (the server before
they became coroutines): the A/B of that change under one load. The wrappers cost a few microseconds a hop.
``--compare-fast-path`` runs one whose images requests all take the FastAPI route (the server before
``server/images_fast_path.py``). ``--compare-checkout <path>`` runs one with the code of another checkout of
this repository (``git worktree add /tmp/base <commit>``): a change's A/B under one load, which separate runs
cannot give (the machine drifts between them by more than the change). ``--acceleration none`` measures eager
servers.
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
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Header, Request

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

HOPS = ["client_send", "arrival", "validated", "enqueued", "picked_up", "engine_start", "engine_end", "to_uint8",
        "encoded", "finish_called", "finished", "loop_woken", "waited", "body_sent", "client_received"]


def serve_traced(trace_path: str, variant: str, argv: list[str]) -> None:
    """Run ``accel-diffusion serve`` with the tracing wrappers in place; one JSON line per HTTP request to
    ``trace_path`` (written after its response has been sent). ``variant``: ``coroutines`` (the server as it
    is), ``pool`` (the route dependencies as plain functions, which FastAPI runs in its thread pool: the server
    before they became coroutines) or ``route`` (the images fast path hands every request to the FastAPI
    route: the server before the fast path), or ``checkout:<path>``: the server as it is in another checkout
    of this repository (a git worktree of an earlier commit, say), for an A/B of a change under one load."""
    if variant.startswith("checkout:"):
        use_checkout(Path(variant.removeprefix("checkout:")))
    from accel_diffusion.server import app as app_module
    from accel_diffusion.server import jobs, schemas, worker

    from accel_diffusion.engine.engine import Engine, GenerationResult

    trace: dict[str, float] = {}
    out = open(trace_path, "a", buffering=1)  # open for the life of the process

    def stamp(name: str, func: Any, at_exit: bool = True, last: bool = False) -> Any:
        """``func`` stamping ``name`` at its entry or exit: the first call's, or with ``last`` the last one's."""
        def mark() -> None:
            if last or name not in trace:
                trace[name] = time.perf_counter()
                if threading.current_thread() is threading.main_thread():  # the event loop's CPU time so far
                    trace[f"{name}_cpu"] = time.thread_time()

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
            trace[f"{name}_cpu"] = time.thread_time()
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
        trace["arrival"], trace["arrival_cpu"] = time.perf_counter(), time.thread_time()

        async def traced_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                trace["body_sent"], trace["body_sent_cpu"] = time.perf_counter(), time.thread_time()

        await middleware_call(self, scope, receive, traced_send)
        out.write(json.dumps(trace) + "\n")

    app_module.RequestIdAndLimits.__call__ = traced_call  # type: ignore[method-assign]
    if variant == "pool":
        use_pool_dependencies(app_module)
    if variant == "route":
        async def through_the_route(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

        app_module.ImagesFastPath.__call__ = through_the_route  # type: ignore[method-assign]
    from accel_diffusion.cli import main

    sys.argv = ["accel-diffusion", *argv]
    main()


def use_checkout(root: Path) -> None:
    """Import ``accel_diffusion`` (with its ``server`` and ``clients`` packages, which live at the repository's
    root) from the checkout at ``root`` instead of the installed one. Call before any of them is imported."""
    import importlib.util

    packages = {"accel_diffusion": root / "accel_diffusion", "accel_diffusion.server": root / "server",
                "accel_diffusion.clients": root / "clients"}

    class CheckoutFinder:
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
            if name not in packages:
                return None  # submodules: found on their package's __path__, which is in the checkout
            return importlib.util.spec_from_file_location(name, packages[name] / "__init__.py",
                                                          submodule_search_locations=[str(packages[name])])

    sys.meta_path.insert(0, CheckoutFinder())


def use_pool_dependencies(app_module: Any) -> None:
    """The API's dependencies as plain functions (run in FastAPI's thread pool), for the A/B row."""
    require_api_key_async = app_module.require_api_key

    def get_state(request: Request) -> Any:
        return request.app.state.server

    def require_api_key(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        coroutine = require_api_key_async(request, authorization)
        try:
            coroutine.send(None)  # it never waits: done at the first step
        except StopIteration:
            return

    def owner(request: Request) -> str | None:
        return app_module.get_owner(request)

    app_module.require_api_key = require_api_key
    object.__setattr__(app_module.State.__metadata__[0], "dependency", get_state)
    object.__setattr__(app_module.Owner.__metadata__[0], "dependency", owner)


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


def measure(servers: dict[str, tuple[int, Path, int]], blocks: int, block: int, engine: Any,
            steps: int | None = None, raw_client: bool = False) -> dict[str, Any]:
    """``servers``: name -> (port, trace file, pid). Blocks of ``block`` direct engine calls and then a block of
    HTTP requests to each server, in turn, so that the machine's load drifts over all of them alike.
    ``raw_client``: the requests go through a RawConnection (benchmarks/serving.py) instead of http.client."""
    from serving import BODY, STEPS, RawConnection, post_images

    from accel_diffusion.strategy import GenerationRequest

    steps = steps or STEPS
    request = GenerationRequest.create(model="shapes", prompt=BODY["prompt"], seed=0, steps=steps)
    body = json.dumps(BODY | {"num_inference_steps": steps})
    connections: dict[str, Any] = {
        name: RawConnection(port, "/v1/images/generations", body.encode()) if raw_client
        else http.client.HTTPConnection("127.0.0.1", port, timeout=120) for name, (port, _, _) in servers.items()}
    clients: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    compute: dict[str, list[float]] = {name: [] for name in servers}
    server_cpu: dict[str, dict[str, float]] = {name: {} for name in servers}
    direct: list[float] = []
    direct_cpu = 0.0

    def post(name: str, keep: bool) -> None:
        connection = connections[name]
        send = time.perf_counter()
        status, payload = post_images(connection, body)
        received = time.perf_counter()
        assert status == 200, payload[:200]
        if keep:
            clients[name].append({"client_send": send, "client_received": received})
            compute[name].append(json.loads(payload)["usage"]["compute_s"])

    engine.generate(request, batch_invariant=True)
    for name in servers:
        post(name, False)
    for _ in range(blocks):
        for _ in range(block):
            begin, cpu = time.perf_counter(), time.process_time()
            engine.generate(request, batch_invariant=True)
            direct.append(time.perf_counter() - begin)
            direct_cpu += time.process_time() - cpu
        time.sleep(0.5)
        for name, (_, _, pid) in servers.items():
            connections[name].close()
            connections[name].connect()
            before = thread_cpu_s(pid)
            for _ in range(block):
                post(name, True)
            for thread, seconds in thread_cpu_s(pid).items():  # the server's CPU time over the block
                server_cpu[name][thread] = server_cpu[name].get(thread, 0.0) + seconds - before.get(thread, 0.0)
            time.sleep(0.5)
    p50 = statistics.median
    result: dict[str, Any] = {"direct_engine_p50_ms": 1e3 * p50(direct),
                              "direct_engine_cpu_ms_per_request": 1e3 * direct_cpu / len(direct)}
    for name, (_, trace_path, _) in servers.items():
        connections[name].close()
        traces = [json.loads(line) for line in trace_path.read_text().splitlines()][-len(clients[name]):]
        rows = [client | server for client, server in zip(clients[name], traces, strict=True)]
        hops = {}
        for first, second in itertools.pairwise(HOPS):
            deltas = [1e3 * (row[second] - row[first]) for row in rows if first in row and second in row]
            hops[f"{first} -> {second}"] = p50(deltas) if deltas else None
        http_ms = [1e3 * (r["client_received"] - r["client_send"]) for r in rows]
        engine_ms = [1e3 * (r["engine_end"] - r["engine_start"]) for r in rows]
        loop_cpu = {f"{first} -> {second}": 1e3 * p50([r[f"{second}_cpu"] - r[f"{first}_cpu"] for r in rows])
                    for first, second in (("arrival", "enqueued"), ("enqueued", "waited"), ("waited", "body_sent"))}
        result[name] = {
            "requests": len(rows), "hops_p50_ms": hops, "http_p50_ms": p50(http_ms),
            "server_engine_p50_ms": p50(engine_ms), "server_engine_timings_total_p50_ms": 1e3 * p50(compute[name]),
            "overhead_ms": p50(http_ms) - 1e3 * p50(direct),  # the serving benchmark's definition
            "http_minus_server_engine_p50_ms": p50([h - e for h, e in zip(http_ms, engine_ms)]),
            "http_minus_server_compute_p50_ms": p50([h - 1e3 * c for h, c in zip(http_ms, compute[name])]),
            # CPU time per request (load-proof, unlike wall times), against the direct engine's
            "event_loop_cpu_p50_ms": loop_cpu,
            "server_cpu_ms_per_request": {thread: 1e3 * s / len(rows) for thread, s in server_cpu[name].items()}}
    return result | {"load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="timed HTTP requests (in blocks of 10)")
    parser.add_argument("--acceleration", choices=["compile", "none"], default="compile")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps per request (default: the serving benchmark's 8); fewer steps, a "
                        "shorter engine run between the server's hops")
    parser.add_argument("--cache-dir", default=None, help="inductor cache (warm start); default: a new one")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--compare-pool-dependencies", action="store_true",
                        help="a second server beside it whose dependencies run in FastAPI's thread pool (as before)")
    parser.add_argument("--compare-fast-path", action="store_true",
                        help="a second server beside it whose images requests all go through the FastAPI route "
                        "(the server before server/images_fast_path.py)")
    parser.add_argument("--raw-client", action="store_true",
                        help="send the requests from a plain socket (serving.RawConnection: what wrk or ab measure) "
                        "instead of Python's http.client")
    parser.add_argument("--compare-checkout", type=Path, default=None,
                        help="a second server beside it running the code of another checkout of this repository "
                        "(e.g. `git worktree add /tmp/base HEAD~1`): an A/B of a change under one load")
    parser.add_argument("--serve-traced", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_traced:
        serve_traced(args.serve_traced[0], args.serve_traced[1], args.serve_traced[2:])
        return
    import tempfile

    os.environ["OMP_NUM_THREADS"] = "1"  # the server (its child) and this process: one torch thread each
    import torch

    torch.set_num_threads(1)
    from engine import _single_model_registry
    from serving import STEPS, free_port, start_server

    from accel_diffusion.engine import Engine, compiled
    from accel_diffusion.models.registry import ModelRegistry

    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor-")
    variants = {"server": "coroutines", "server_pool_dependencies": "pool", "server_without_fast_path": "route"}
    names = ["server", *(["server_pool_dependencies"] if args.compare_pool_dependencies else []),
             *(["server_without_fast_path"] if args.compare_fast_path else []),
             *(["server_at_checkout"] if args.compare_checkout else [])]
    if args.compare_checkout:
        variants["server_at_checkout"] = f"checkout:{args.compare_checkout.resolve()}"
    servers: dict[str, tuple[int, Path, int]] = {}
    processes = []
    try:
        for name in names:
            trace_path = Path(tempfile.mkdtemp(prefix="server-hops-")) / "trace.jsonl"
            trace_path.touch()
            port = free_port()
            # buckets [1, 2]: the graphs a lone CFG request runs (UNet 2 rows, decode 1); the server warms only them
            entry = [str(Path(__file__).resolve()), "--serve-traced", str(trace_path), variants[name]]
            processes.append(start_server(port, queue_max=8, ready_timeout_s=1800, entry=entry,
                                          engine_acceleration=args.acceleration, inductor_cache_dir=cache,
                                          compile_buckets="[1, 2]"))
            servers[name] = (port, trace_path, processes[-1].pid)
        model = ModelRegistry.default().get("shapes")
        if args.acceleration == "compile":
            compiled.set_cache_dir(cache)  # the graph the server built loads from its cache
            model.compiled_model((1, 2))
            compiled.warm(model)
        engine = Engine(_single_model_registry(model), acceleration=args.acceleration, buckets=(1, 2))
        result = measure(servers, max(1, args.requests // 10), 10, engine, args.steps, args.raw_client)
    finally:
        for process in processes:
            process.terminate()
            process.wait(120)
    result |= {"acceleration": args.acceleration, "steps": args.steps or STEPS,
               "client": "raw socket" if args.raw_client else "http.client", "torch": torch.__version__}
    if args.compare_checkout:
        import subprocess

        commit = subprocess.run(["git", "-C", str(args.compare_checkout), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        result["checkout"] = {"path": str(args.compare_checkout), "commit": commit}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
