"""The scale-out overlays (deploy/k8s/overlays/cpu and gpu) agree with the code: the API and worker commands are
the server's roles on the Redis backend, their settings (config file + environment, the Secret's password expanded
as the kubelet does) are accepted by ServerSettings, probes hit the server's routes, the KEDA trigger reads the
stream and consumer group the Redis backend really uses, and the NetworkPolicies let only the API, the workers and
KEDA's operator reach Redis."""

from __future__ import annotations

import copy
import inspect
import tomllib
from typing import Any

import jsonschema
import pytest
from conftest import require_tool
from deploy_checks import (
    K8S,
    click_parse,
    config_files,
    env_problems,
    expand,
    literal_env,
    named,
    probe_problems,
    render,
    server_routes,
)

SERVER_PORT = 8000
# the redis-streams scaler's trigger metadata (KEDA v2.20.1, pkg/scalers/redis_streams_scaler.go and the
# connection fields of redis_scaler.go): the CRD types metadata as a map of strings, so a misspelled key passes it
REDIS_STREAMS_KEYS = {"pendingEntriesCount", "streamLength", "lagCount", "stream", "consumerGroup", "databaseIndex",
                      "activationLagCount", "enableTLS", "address", "addresses", "username", "host", "hosts", "port",
                      "ports", "unsafeSsl", "sentinelUsername", "sentinelMaster"}


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    kubectl = require_tool("kubectl")
    return {name: render(K8S / "overlays" / name, kubectl) for name in ("cpu", "gpu")}


def workload(docs: list[dict[str, Any]], kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    (obj,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    pod = obj["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod


def settings_of(docs: list[dict[str, Any]], name: str, password: str = "s3cret") -> Any:
    """ServerSettings as the container builds them: `serve --config FILE --role R` plus its environment."""
    from accel_diffusion.server import ServerSettings

    from accel_diffusion.cli import main

    container, pod = workload(docs, "Deployment", name)
    _, params = click_parse(main, container["args"])
    values = tomllib.loads(config_files(docs, pod, container)[params["config_file"]])["server"]
    env = literal_env(container) | {"REDIS_PASSWORD": password}
    for var, value in env.items():
        if var.startswith("ACCEL_DIFFUSION_") and var != "ACCEL_DIFFUSION_MODELS":
            values[var.removeprefix("ACCEL_DIFFUSION_").lower()] = expand(value, env)
    return ServerSettings.model_validate(values | {"role": params["role"]})


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_api_and_worker_are_the_server_roles_on_redis(overlays: dict[str, list[dict[str, Any]]],
                                                      overlay: str) -> None:
    docs = overlays[overlay]
    api, worker = settings_of(docs, "accel-diffusion-api"), settings_of(docs, "accel-diffusion-worker")
    assert (api.role, worker.role) == ("api", "worker")
    assert api.queue_backend == worker.queue_backend == "redis"
    assert api.redis_url == worker.redis_url == "redis://:s3cret@accel-diffusion-redis:6379/0"
    assert api.redis_prefix == worker.redis_prefix and api.served_models == worker.served_models == ["shapes"]
    (redis_service,) = named(docs, "Service", "accel-diffusion-redis")
    assert redis_service["spec"]["ports"][0]["port"] == 6379
    (redis_set,) = named(docs, "StatefulSet")
    assert redis_set["spec"]["serviceName"] == redis_service["metadata"]["name"]
    # the password: one Secret for the servers, Redis (--requirepass, expanded by the kubelet) and KEDA
    refs = set()
    for name in ("accel-diffusion-api", "accel-diffusion-worker"):
        container, _ = workload(docs, "Deployment", name)
        assert env_problems(name, container) == []
        refs |= {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
                 for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})}
    redis_container, _ = workload(docs, "StatefulSet", "accel-diffusion-redis")
    assert expand(" ".join(redis_container["args"]), {"REDISCLI_AUTH": "pw"}).endswith("--requirepass pw")
    refs |= {(v["valueFrom"]["secretKeyRef"]["name"], v["valueFrom"]["secretKeyRef"]["key"])
             for v in redis_container["env"]}
    (auth,) = named(docs, "TriggerAuthentication")
    refs |= {(s["name"], s["key"]) for s in auth["spec"]["secretTargetRef"]}
    assert refs == {("accel-diffusion-redis", "password")}
    # a misspelled variable is still caught, and an expansion of a name nobody defines is not an excuse
    bad = copy.deepcopy(workload(docs, "Deployment", "accel-diffusion-api")[0])
    bad["env"].append({"name": "ACCEL_DIFFUSION_REDIS_PREFX", "value": "x"})
    (problem,) = env_problems("api", bad)
    assert problem.startswith("api: env ACCEL_DIFFUSION_REDIS_PREFX is read by nothing") and \
        problem.endswith("did you mean ACCEL_DIFFUSION_REDIS_PREFIX?")


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_probes_grace_and_scaling_targets(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    from accel_diffusion.server.process import serve

    docs = overlays[overlay]
    routes = server_routes()
    drain_s = inspect.signature(serve).parameters["drain_timeout_s"].default
    for name in ("accel-diffusion-api", "accel-diffusion-worker"):
        container, pod = workload(docs, "Deployment", name)
        assert probe_problems(name, container, routes, SERVER_PORT) == []
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"  # a Redis outage restarts nothing
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pod["terminationGracePeriodSeconds"] >= drain_s + int(pre_stop[1]) + 10
    redis_container, _ = workload(docs, "StatefulSet", "accel-diffusion-redis")
    assert redis_container["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert {"REDISCLI_AUTH"} == {v["name"] for v in redis_container["env"]}  # redis-cli's password variable
    (hpa,) = named(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "accel-diffusion-api" and hpa["spec"]["minReplicas"] >= 2
    (pdb,) = named(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_keda_trigger_reads_the_queue_the_backend_writes(overlays: dict[str, list[dict[str, Any]]],
                                                             overlay: str) -> None:
    from accel_diffusion.server.redis_backend import GROUP, RedisJobQueue

    docs = overlays[overlay]
    worker = settings_of(docs, "accel-diffusion-worker")
    queue = RedisJobQueue(worker.redis_url, worker.redis_prefix)  # connects lazily: only the key names are used
    (scaled,) = named(docs, "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "accel-diffusion-worker"
    assert [t["metadata"]["stream"] for t in spec["triggers"]] == [queue.queue_key(m) for m in worker.served_models]
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams" and set(meta) <= REDIS_STREAMS_KEYS, set(meta) - REDIS_STREAMS_KEYS
        assert meta["consumerGroup"] == GROUP and int(meta["lagCount"]) >= 1
        assert meta["address"] == f"accel-diffusion-redis.{scaled['metadata']['namespace']}.svc.cluster.local:6379"
        (auth,) = named(docs, "TriggerAuthentication")
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert "lagcount" not in REDIS_STREAMS_KEYS and "consumergroup" not in REDIS_STREAMS_KEYS  # case matters to KEDA
    assert queue.queue_key("shapes") != queue.queue_key("sd15")  # one stream per model: one trigger each
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300  # slow: a worker leaves at most 1 per 5 minutes
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    queue.close()


def test_keda_schemas_catch_a_wrong_field(overlays: dict[str, list[dict[str, Any]]]) -> None:
    from test_k8s import validate

    (scaled,) = named(overlays["cpu"], "ScaledObject")
    validate(scaled)
    bad = copy.deepcopy(scaled)
    bad["spec"]["minReplicaCount"] = "1"
    with pytest.raises(jsonschema.ValidationError, match="'1' is not of type 'integer'"):
        validate(bad)
    bad = copy.deepcopy(scaled)
    del bad["spec"]["triggers"][0]["type"]
    with pytest.raises(jsonschema.ValidationError, match="'type' is a required property"):
        validate(bad)


def test_only_the_api_the_workers_and_keda_reach_redis(overlays: dict[str, list[dict[str, Any]]]) -> None:
    docs = overlays["cpu"]
    policies = {p["metadata"]["name"]: p["spec"] for p in named(docs, "NetworkPolicy")}
    redis_policy = policies["accel-diffusion-redis"]
    assert redis_policy["egress"] == [] and redis_policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = redis_policy["ingress"]
    sources = [(tuple(sorted(p.get("namespaceSelector", {}).get("matchLabels", {}).items())),
                tuple(sorted(p["podSelector"]["matchLabels"].items()))) for p in rule["from"]]
    assert sources == [((), (("app.kubernetes.io/component", "api"), ("app.kubernetes.io/name", "accel-diffusion"))),
                       ((), (("app.kubernetes.io/component", "worker"),
                             ("app.kubernetes.io/name", "accel-diffusion"))),
                       ((("kubernetes.io/metadata.name", "keda"),), (("app", "keda-operator"),))]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    for name in ("accel-diffusion-api", "accel-diffusion-worker"):  # each may reach Redis and DNS, nothing else
        egress = policies[name]["egress"]
        assert egress[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
        assert [p["port"] for p in egress[1]["ports"]] == [53, 53] and "to" not in egress[1] and len(egress) == 2
    assert "from" not in policies["accel-diffusion-api"]["ingress"][0]  # clients, from anywhere
    (worker_in,) = policies["accel-diffusion-worker"]["ingress"]
    assert worker_in["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "prometheus"}}}]
    (redis_set,) = named(docs, "StatefulSet")
    labels = redis_set["spec"]["template"]["metadata"]["labels"]
    assert redis_policy["podSelector"]["matchLabels"].items() <= labels.items()


def test_gpu_workers_get_a_gpu_and_the_cuda_image(overlays: dict[str, list[dict[str, Any]]]) -> None:
    cpu_worker, _ = workload(overlays["cpu"], "Deployment", "accel-diffusion-worker")
    worker, pod = workload(overlays["gpu"], "Deployment", "accel-diffusion-worker")
    api, api_pod = workload(overlays["gpu"], "Deployment", "accel-diffusion-api")
    assert "nvidia.com/gpu" not in cpu_worker["resources"]["limits"] and cpu_worker["image"].endswith("-cpu")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and worker["image"].endswith(":0.1.0-cuda")
    assert api["image"].endswith(":0.1.0-cpu") and "tolerations" not in api_pod  # the API stays on CPU nodes
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}["dshm"] == "/dev/shm"
    assert literal_env(worker)["OMP_NUM_THREADS"] == "4"
