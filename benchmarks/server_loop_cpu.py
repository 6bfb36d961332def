"""The event loop's own CPU time per synchronous request, this checkout against an older commit, alternating.

    python benchmarks/server_loop_cpu.py --requests 100 --rounds 2 --baseline-commit cae07f3 \
        --out benchmarks/results/server_loop_cpu.json

Each run is a fresh process serving ``shapes`` (eager, one torch thread) with uvicorn in its main thread, as
``accel-diffusion serve`` does, and a client thread sending ``POST /v1/images/generations`` (1 step, so that
the engine's share is small) over one keep-alive connection: 20 warm-up requests, then ``--requests`` timed
ones. Per request, the CPU time the event loop's thread spends from the ASGI call to the last body byte handed
to uvicorn (``time.thread_time``: unlike wall times, a loaded machine does not inflate it much). With
``--baseline-commit`` the same runs of that commit's tree (``git archive``, imported through PYTHONPATH) take
turns with this checkout's, so that both see the same load. The event loop's whole share of a request is
uvicorn's parsing, the middleware, FastAPI's routing and dependencies, validation, the job's checks and
queueing, the wake-up and the response (benchmarks/server_hops.py splits it into hops).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a red circle on a blue background", "seed": 0, "num_inference_steps": 1}
WARM_UP = 20


def child(requests: int, port: int) -> None:
    """One measured server run; prints one JSON line."""
    import torch

    torch.set_num_threads(1)
    from accel_diffusion.server import app as app_module
    from accel_diffusion.server import create_app
    from accel_diffusion.server.process import DrainingServer, uvicorn_config
    from accel_diffusion.server.settings import ServerSettings

    settings = ServerSettings(served_models=["shapes"], warmup_steps=0, engine_acceleration="none", port=port,
                              host="127.0.0.1")
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings, 10, log_level="warning"), app, 10)
    cpu: list[float] = []
    wall: list[float] = []
    middleware_call = app_module.RequestIdAndLimits.__call__

    async def timed(self: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/images/generations":
            await middleware_call(self, scope, receive, send)
            return
        begin = time.thread_time()

        async def timed_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                cpu.append(time.thread_time() - begin)

        await middleware_call(self, scope, receive, timed_send)

    app_module.RequestIdAndLimits.__call__ = timed  # type: ignore[method-assign]
    failure: list[str] = []

    def client() -> None:
        try:
            while True:
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    connection.request("GET", "/health/ready")
                    answer = connection.getresponse()
                    answer.read()
                    if answer.status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            body = json.dumps(BODY)
            for _ in range(WARM_UP + requests):
                begin = time.perf_counter()
                connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
                answer = connection.getresponse()
                payload = answer.read()
                wall.append(time.perf_counter() - begin)
                if answer.status != 200:
                    failure.append(f"{answer.status}: {payload[:200]!r}")
                    return
        finally:
            server.should_exit = True

    threading.Thread(target=client, daemon=True).start()
    server.run()
    if failure:
        raise SystemExit(f"a request failed: {failure[0]}")
    print(json.dumps({"loop_cpu_p50_ms": 1e3 * statistics.median(cpu[WARM_UP:]),
                      "loop_cpu_mean_ms": 1e3 * statistics.mean(cpu[WARM_UP:]),
                      "http_p50_ms": 1e3 * statistics.median(wall[WARM_UP:]), "requests": len(cpu[WARM_UP:]),
                      "load_average": os.getloadavg()[0]}))


def baseline_tree(commit: str, tree: Path) -> Path:
    """``commit``'s tree extracted into ``tree``, importable as ``accel_diffusion`` through PYTHONPATH (its
    ``server/`` and ``clients/`` linked where the installed package maps them)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for name in ("server", "clients"):
        (tree / "accel_diffusion" / name).symlink_to(tree / name)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--baseline-commit", default=None, help="a commit to compare with (e.g. the last merge)")
    parser.add_argument("--port", type=int, default=18741)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.port)
        return
    with tempfile.TemporaryDirectory(prefix="loop-cpu-baseline-") as scratch:  # the baseline's tree, removed after
        variants = {"current": None}
        if args.baseline_commit:
            tree = str(baseline_tree(args.baseline_commit, Path(scratch)))
            variants = {f"baseline_{args.baseline_commit}": tree, **variants}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, path in variants.items():
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **({"PYTHONPATH": path} if path else {})}
                done = subprocess.run([sys.executable, __file__, "--child", str(args.requests), "--port",
                                       str(args.port)], env=env, cwd="/", capture_output=True, text=True, check=True,
                                      timeout=1800)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(name, runs[name][-1], flush=True)
    result = {name: {"loop_cpu_p50_ms": [r["loop_cpu_p50_ms"] for r in rs], "runs": rs} for name, rs in runs.items()}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
