"""The rendered `single` overlay, run here: its server container's command, arguments, environment and mounted
files (ConfigMap, Secret, volumes laid out under tmp_path) as a process, probed as the kubelet would (startup, then
readiness and liveness, on the container port), then stopped as the kubelet stops it (preStop, SIGTERM) while a
job runs: it drains and exits within the grace period. The pod IP and port become 127.0.0.1 and a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import require_tool
from deploy_checks import K8S, ROOT, lay_out_pod, named, pod_env, render


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float, headers: dict[str, str] | None = None, data: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Content-Type": "application/json", **(headers or {})},
                                     data=None if data is None else json.dumps(data).encode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def kubelet_probe(port: int, probe: dict[str, Any], server: subprocess.Popen) -> float:
    """Run ``probe`` as the kubelet does (a status 200-399 within timeoutSeconds succeeds; failureThreshold
    failures in a row, periodSeconds apart, fail it); the seconds it took to succeed."""
    start, failures = time.monotonic(), 0
    while True:
        assert server.poll() is None, "the server exited"
        try:
            status, _ = get(f"http://127.0.0.1:{port}{probe['httpGet']['path']}", probe.get("timeoutSeconds", 1))
        except OSError:
            status = None
        if status is not None and 200 <= status < 400:
            return time.monotonic() - start
        failures += 1
        assert failures < probe.get("failureThreshold", 3), f"{probe} failed {failures} times"
        time.sleep(probe.get("periodSeconds", 10))


def test_the_single_pod_starts_serves_and_drains_as_in_a_cluster(tmp_path: Path) -> None:
    docs = render(K8S / "overlays" / "single", require_tool("kubectl"))
    (deployment,) = named(docs, "Deployment", "accel-diffusion-server")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    local = lay_out_pod(docs, pod, container, tmp_path / "pod")
    volumes = {v["name"]: v for v in pod["volumes"]}
    key = "k8s-" + os.urandom(8).hex()
    for mount in container["volumeMounts"]:
        if "secret" in volumes[mount["name"]]:  # the operator's Secret: one API key per line
            for item in volumes[mount["name"]]["secret"]["items"]:
                Path(local(f"{mount['mountPath']}/{item['path']}")).write_text(key + "\n")

    port = free_port()
    env = pod_env(container, local) | {"ACCEL_DIFFUSION_HOST": "127.0.0.1",  # the pod IP and port, here
                                       "ACCEL_DIFFUSION_PORT": str(port),
                                       # eager: the default compile costs minutes of startup on these cores
                                       "ACCEL_DIFFUSION_ENGINE_ACCELERATION": "none"}
    (ports,) = container["ports"]
    assert container["command"] == ["accel-diffusion"]
    argv = [sys.executable, "-m", "accel_diffusion.cli", *(local(a) for a in container["args"])]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        probes = {kind: {**container[kind], "httpGet": {**container[kind]["httpGet"], "port": port}}
                  for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert container["startupProbe"]["httpGet"]["port"] == ports["name"]
        started_s = kubelet_probe(port, probes["startupProbe"], server)
        assert started_s < probes["startupProbe"]["periodSeconds"] * probes["startupProbe"]["failureThreshold"]
        kubelet_probe(port, probes["readinessProbe"], server)
        kubelet_probe(port, probes["livenessProbe"], server)
        assert get(f"http://127.0.0.1:{port}/health/ready", 3) == (200, {"status": "ready", "models": ["shapes"]})
        assert get(f"http://127.0.0.1:{port}/health/live", 3) == (200, {"status": "alive"})

        # the image's HEALTHCHECK command, as Docker runs it in the container
        healthcheck = [sys.executable, "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' "
                       "+ os.environ.get('ACCEL_DIFFUSION_PORT', '8000') + '/health/live', timeout=4)"]
        assert healthcheck[2] in (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()
        assert subprocess.run(healthcheck, env=env, timeout=30).returncode == 0
        closed = {**env, "ACCEL_DIFFUSION_PORT": str(free_port())}
        assert subprocess.run(healthcheck, env=closed, timeout=30, capture_output=True).returncode == 1

        # the API key from the mounted Secret is the server's
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/v1/models", 10)[0] == 401
        status, models = get(f"{base}/v1/models", 10, {"Authorization": f"Bearer {key}"})
        assert status == 200 and [m["id"] for m in models["data"]] == ["shapes"]

        # stopping: preStop, then SIGTERM while a job runs; it drains and exits within the grace period
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert subprocess.run(pre_stop, timeout=60).returncode == 0
        auth = {"Authorization": f"Bearer {key}"}
        status, job = get(f"{base}/v1/jobs", 10, auth, {"prompt": "a red circle", "steps": 30, "n": 4, "seed": 1})
        assert status == 202
        events = urllib.request.urlopen(urllib.request.Request(f"{base}/v1/jobs/{job['id']}/events", headers=auth),
                                        timeout=120)
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10  # the signal reaches the event loop: readiness turns 503
        while get(f"{base}/health/ready", 3)[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get(f"{base}/health/ready", 3)[0] == 503
        assert get(f"{base}/health/live", 3)[0] == 200
        assert get(f"{base}/v1/jobs", 10, auth, {"prompt": "a white cross", "steps": 2})[0] == 503
        with events:  # the running job finishes during the drain
            kinds = [line.decode().split(":", 1)[1].strip() for line in events if line.startswith(b"event:")]
        assert kinds[-1] == "job.completed" and "job.progress" in kinds, kinds
        assert server.wait(timeout=pod["terminationGracePeriodSeconds"]) == 0
        assert time.monotonic() - stopping < pod["terminationGracePeriodSeconds"]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "ready in" in output and "serving shapes" in output, output[-3000:]
