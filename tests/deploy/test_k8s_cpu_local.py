"""The rendered `cpu` overlay, run here: Redis as its StatefulSet runs it (redis-server with the mounted redis.conf
and the Secret's password), then the API and worker containers' commands, arguments, environment and mounted files
as processes, each probed as the kubelet would; one job through the API completes on the worker, and the Redis
stream and consumer group the KEDA trigger names are the ones that job went through. Then a scale-down: the worker
stopped mid-job finishes that job (not rerun), leaves the queued one in the stream and exits within its grace
period; a new worker runs the queued job. The Service names and ports
become 127.0.0.1 and free ports; the password is a fresh one, expanded as the kubelet does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from conftest import require_tool
from deploy_checks import K8S, expand, lay_out_pod, named, pod_env, render
from test_k8s_single_local import free_port, get, kubelet_probe


def pod_of(docs: list[dict[str, Any]], kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    pod = obj["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod


def test_the_cpu_overlay_runs_api_worker_and_redis_and_completes_a_job(tmp_path: Path) -> None:
    redis_server = require_tool("redis-server")
    require_tool("redis-cli")
    docs = render(K8S / "overlays" / "cpu", require_tool("kubectl"))
    password = os.urandom(16).hex()
    redis_port = free_port()
    processes: list[tuple[subprocess.Popen, Any]] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        processes.append((process, log))
        return process

    try:
        # Redis, as the StatefulSet runs it: its config file moved under tmp_path (dir /data with it)
        container, pod = pod_of(docs, "StatefulSet", "accel-diffusion-redis")
        local = lay_out_pod(docs, pod, container, tmp_path / "redis")
        secret_env = {"REDISCLI_AUTH": password}
        argv = [expand(local(a), secret_env) for a in container["command"] + container["args"]]
        assert argv[0] == "redis-server" and argv[-2:] == ["--requirepass", password]
        server = start("redis", [redis_server, *argv[1:], "--port", str(redis_port), "--bind", "127.0.0.1"],
                       dict(os.environ))
        probe_env = dict(os.environ) | secret_env
        deadline = time.monotonic() + 20
        while True:  # the readiness probe's command, with the container's REDISCLI_AUTH
            probe = container["readinessProbe"]["exec"]["command"]  # the Service's port: here a free one
            ping = subprocess.run([probe[0], "-p", str(redis_port), *probe[1:]],
                                  env=probe_env, capture_output=True, text=True, timeout=10)
            if ping.stdout.strip() == "PONG":
                break
            assert server.poll() is None and time.monotonic() < deadline, ping
            time.sleep(0.1)
        client = redis.Redis(port=redis_port, password=password, decode_responses=True)
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "noeviction"
        assert config["dir"] == str(tmp_path / "redis" / "data")
        no_password = subprocess.run(["redis-cli", "-p", str(redis_port), "ping"], capture_output=True, text=True,
                                     env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}, timeout=10)
        assert "NOAUTH" in no_password.stdout + no_password.stderr

        # the API and the worker, as their Deployments run them
        key = "k8s-" + os.urandom(8).hex()
        ports = {}
        servers = {}
        launch = {}
        for role in ("worker", "api"):
            container, pod = pod_of(docs, "Deployment", f"accel-diffusion-{role}")
            local = lay_out_pod(docs, pod, container, tmp_path / role)
            volumes = {v["name"]: v for v in pod["volumes"]}
            for mount in container["volumeMounts"]:
                if "secret" in volumes[mount["name"]]:
                    for item in volumes[mount["name"]]["secret"]["items"]:
                        Path(local(f"{mount['mountPath']}/{item['path']}")).write_text(key + "\n")
            env = pod_env(container, local) | {"REDIS_PASSWORD": password}
            url = expand(env["ACCEL_DIFFUSION_REDIS_URL"], env)
            assert url == f"redis://:{password}@accel-diffusion-redis:6379/0"
            ports[role] = free_port()
            env |= {"ACCEL_DIFFUSION_REDIS_URL": url.replace("accel-diffusion-redis:6379", f"127.0.0.1:{redis_port}"),
                    "ACCEL_DIFFUSION_HOST": "127.0.0.1", "ACCEL_DIFFUSION_PORT": str(ports[role]),
                    "ACCEL_DIFFUSION_ENGINE_ACCELERATION": "none"}  # the default compile: minutes of startup here
            assert container["command"] == ["accel-diffusion"]
            launch[role] = ([sys.executable, "-m", "accel_diffusion.cli", *(local(a) for a in container["args"])], env)
            servers[role] = start(role, *launch[role])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = {**container[kind], "httpGet": {**container[kind]["httpGet"], "port": ports[role]}}
                kubelet_probe(ports[role], probe, servers[role])
            assert get(f"http://127.0.0.1:{ports[role]}/health/ready", 3) == (
                200, {"status": "ready", "models": ["shapes"]})

        # one job through the API, run by the worker
        api = f"http://127.0.0.1:{ports['api']}"
        auth = {"Authorization": f"Bearer {key}"}
        assert get(f"{api}/v1/jobs", 10, data={"prompt": "a red circle", "steps": 2})[0] == 401
        status, job = get(f"{api}/v1/jobs", 10, auth, {"prompt": "a red circle", "steps": 4, "seed": 3})
        assert status == 202, job
        deadline = time.monotonic() + 120
        while (record := get(f"{api}/v1/jobs/{job['id']}", 10, auth)[1])["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, record
            time.sleep(0.2)
        assert record["status"] == "succeeded", record
        # the worker made the image, the API none (it loads no model)
        for role, images in (("worker", 1), ("api", 0)):
            lines = urllib_text(f"http://127.0.0.1:{ports[role]}/metrics").splitlines()
            assert f"accel_diffusion_images_total {float(images)}" in lines, (role, [
                line for line in lines if line.startswith("accel_diffusion_images")])

        # the KEDA trigger's stream and consumer group are the ones the job went through; nothing is left waiting
        (scaled,) = named(docs, "ScaledObject")
        (trigger,) = scaled["spec"]["triggers"]
        groups = {g["name"]: g for g in client.xinfo_groups(trigger["metadata"]["stream"])}
        group = groups[trigger["metadata"]["consumerGroup"]]
        assert group["entries-read"] == 1 and group["lag"] == 0 and group["pending"] == 0, group

        # scale-down as KEDA does it: the worker pod stopped (SIGTERM) while it runs a job and another
        # waits: the running job completes on it, the waiting one stays in the stream (the lag KEDA reads) and the
        # worker exits within the grace period; a new worker (scale-up) runs the waiting job
        container, pod = pod_of(docs, "Deployment", "accel-diffusion-worker")
        running = get(f"{api}/v1/jobs", 10, auth, {"prompt": "a red circle", "steps": 30, "n": 4, "seed": 4})[1]
        waiting = get(f"{api}/v1/jobs", 10, auth, {"prompt": "a white cross", "steps": 4, "seed": 5})[1]
        deadline = time.monotonic() + 60
        while client.hget(f"ad:job:{running['id']}", "status") != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stopping = time.monotonic()  # (the preStop pause before it: test_k8s_single_local.py)
        servers["worker"].send_signal(signal.SIGTERM)
        assert servers["worker"].wait(timeout=pod["terminationGracePeriodSeconds"]) == 0
        assert time.monotonic() - stopping < pod["terminationGracePeriodSeconds"]
        assert get(f"{api}/v1/jobs/{running['id']}", 10, auth)[1]["status"] == "succeeded"
        assert client.hget(f"ad:job:{running['id']}", "attempt") == "1"  # not rerun
        assert get(f"{api}/v1/jobs/{waiting['id']}", 10, auth)[1]["status"] == "queued"
        group = {g["name"]: g for g in client.xinfo_groups(trigger["metadata"]["stream"])}["workers"]
        assert group["lag"] == 1 and group["pending"] == 0, group
        servers["worker"] = start("worker-2", *launch["worker"])
        deadline = time.monotonic() + 120
        while (record := get(f"{api}/v1/jobs/{waiting['id']}", 10, auth)[1])["status"] != "succeeded":
            assert time.monotonic() < deadline and servers["worker"].poll() is None, record
            time.sleep(0.2)
        client.close()
    finally:
        for process, log in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
            log.close()


def urllib_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
