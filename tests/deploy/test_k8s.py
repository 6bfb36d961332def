"""The Kubernetes manifests (deploy/k8s/): every kustomization renders with the real `kubectl kustomize`, every
object validates offline against the Kubernetes OpenAPI schemas (kubernetes-validate, strict) or, for the
ServiceMonitor, against the Prometheus operator's vendored CRD schema, and the manifests agree with the code:
commands parse with the real CLIs, probes hit routes the server serves on its port, every environment variable
and config key is read by something, metric names are ones the server exports."""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import require_tool
from deploy_checks import (
    K8S,
    KUBERNETES_VERSION,
    LIBRARY_ENV,
    METRIC_NAME,
    ROOT,
    WRITTEN_ENV,
    click_parse,
    command_problems,
    config_files,
    containers,
    env_problems,
    kustomizations,
    library_view,
    literal_env,
    named,
    pod_specs,
    probe_problems,
    render,
    server_config_problems,
    server_routes,
    writable_problems,
)

CRDS = Path(__file__).parent / "crds"
SERVER_PORT = 8000


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = require_tool("kubectl")
    return {str(path.relative_to(K8S)): render(path, kubectl) for path in kustomizations()}


@pytest.fixture(scope="module")
def single(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered["overlays/single"]


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return server_routes()


def server_container(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = named(docs, "Deployment", "accel-diffusion-server")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container, pod


def crd_schema(kind: str) -> dict[str, Any]:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
            return version["schema"]["openAPIV3Schema"]
    raise LookupError(f"no vendored CRD for {kind}")


def validate(doc: dict[str, Any]) -> None:
    """Strict OpenAPI validation; custom resources against their vendored CRD schema."""
    if doc["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
        jsonschema.validate(doc, crd_schema(doc["kind"]))
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kustomizations_and_what_they_render(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: sorted(d["kind"] for d in docs) for name, docs in rendered.items()}
    assert kinds == {
        "batch": ["ConfigMap", "Job", "NetworkPolicy", "PersistentVolumeClaim"],
        "overlays/single": ["ConfigMap", "Deployment", "Job", "NetworkPolicy", "NetworkPolicy",
                            "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "ServiceAccount",
                            "ServiceMonitor"]} | {
        "overlays/multi-gpu": ["ConfigMap", "Deployment", "Job", "NetworkPolicy", "NetworkPolicy",
                               "PersistentVolumeClaim", "PodDisruptionBudget", "Service", "ServiceAccount",
                               "ServiceMonitor"]} | {
        f"overlays/{name}": ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "HorizontalPodAutoscaler", "Job",
                             "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy",
                             "PersistentVolumeClaim", "PodDisruptionBudget", "ScaledObject", "Service", "Service",
                             "Service", "ServiceAccount", "ServiceMonitor", "StatefulSet", "TriggerAuthentication"]
        for name in ("cpu", "gpu")}


def test_every_object_validates_against_its_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for doc in docs:
            validate(doc)


def test_validation_catches_a_misspelled_field_and_a_wrong_type(single: list[dict[str, Any]]) -> None:
    (deployment,) = named(single, "Deployment")
    bad = copy.deepcopy(deployment)
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        validate(bad)
    (monitor,) = named(single, "ServiceMonitor")
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["scrapeTimeout"] = 10  # a duration string, e.g. "10s"
    with pytest.raises(jsonschema.ValidationError, match="10 is not of type 'string'"):
        validate(bad)


def test_every_container_is_locked_down_and_sized(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for where, pod in pod_specs(docs):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] > 0, where
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["automountServiceAccountToken"] is False, where
        for where, container, _ in containers(docs):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly"), where
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), image


def test_every_command_parses_with_the_real_cli(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for where, container, _ in containers(docs):
            assert command_problems(where, container["command"] + container.get("args", [])) == []


def test_a_misspelled_flag_fails_the_command_check() -> None:
    argv = ["accel-diffusion", "batch", "m.jsonl", "--out", "o", "--num-shard", "3"]
    problems = command_problems("Job/x/batch", argv)
    assert problems == ["Job/x/batch: accel-diffusion batch m.jsonl --out o --num-shard 3: No such option "
                        "'--num-shard'. Did you mean '--num-shards'?"]
    assert command_problems("Job/y/fill", ["hf", "download", "a/b", "--revison", "x"])[0].startswith(
        "Job/y/fill: hf download a/b --revison x: No such option '--revison'")
    assert command_problems("Deployment/s/server", ["accel-diffusion", "serve", "--port", "http"]) == [
        "Deployment/s/server: accel-diffusion serve --port http: Invalid value for '--port': 'http' is not a valid "
        "integer."]


def test_every_env_var_and_config_key_is_read_by_something(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for docs in rendered.values():
        for where, container, pod in containers(docs):
            assert env_problems(where, container) == []
            for path, text in config_files(docs, pod, container).items():
                if path.endswith("/server.toml"):
                    assert server_config_problems(f"{where}:{path}", text) == []


def test_a_misspelled_setting_fails(single: list[dict[str, Any]]) -> None:
    container, pod = server_container(single)
    bad = copy.deepcopy(container)
    bad["env"] += [{"name": "ACCEL_DIFFUSION_QUEUE_MAXX", "value": "8"}, {"name": "HF_HUB_OFLINE", "value": "1"}]
    assert env_problems("Deployment/s/server", bad) == [
        "Deployment/s/server: env ACCEL_DIFFUSION_QUEUE_MAXX is read by nothing (not a server setting, the model "
        "registry's, the batch CLI's, a library's or expanded by the kubelet); did you mean ACCEL_DIFFUSION_QUEUE_MAX?",
        "Deployment/s/server: env HF_HUB_OFLINE is read by nothing (not a server setting, the model registry's, the "
        "batch CLI's, a library's or expanded by the kubelet); did you mean HF_HUB_OFFLINE?"]
    (toml_text,) = [t for p, t in config_files(single, pod, container).items() if p.endswith("server.toml")]
    problems = server_config_problems("server.toml", toml_text.replace("queue_max =", "queue_maxx ="))
    assert problems == ["server.toml: 'queue_maxx' is not a server setting (server/settings.py ServerSettings)"]
    problems = server_config_problems("server.toml", toml_text.replace("queue_max = 64", "queue_max = 0"))
    assert len(problems) == 1 and "queue_max" in problems[0] and "greater than or equal to 1" in problems[0]


def test_the_server_config_is_what_the_deployment_runs(single: list[dict[str, Any]], tmp_path: Path) -> None:
    """`serve --config` names the mounted server.toml; its models_file is the mounted models.toml, which the
    model registry reads; its api_keys_file is the mounted Secret's key."""
    from accel_diffusion.server import ServerSettings

    from accel_diffusion.cli import main
    from accel_diffusion.models.registry import ModelRegistry

    container, pod = server_container(single)
    files = config_files(single, pod, container)
    _, params = click_parse(main, container["args"])
    settings = ServerSettings.model_validate(tomllib.loads(files[params["config_file"]])["server"])
    assert settings.port == SERVER_PORT and settings.host == "0.0.0.0" and settings.served_models == ["shapes"]
    (tmp_path / "models.toml").write_text(files[str(settings.models_file)])
    registry = ModelRegistry.from_file(tmp_path / "models.toml")
    assert set(settings.served_models) <= set(registry.ids())
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret = {v["name"]: v for v in pod["volumes"]}["api-keys"]["secret"]
    assert str(settings.api_keys_file) == f"{mounts['api-keys']['mountPath']}/{secret['items'][0]['path']}"
    assert mounts["api-keys"]["readOnly"] is True and secret["secretName"] == "accel-diffusion-api-keys"


def test_probes_are_routes_of_the_server_on_its_port(single: list[dict[str, Any]], routes: set[str]) -> None:
    container, _ = server_container(single)
    assert probe_problems("server", container, routes, SERVER_PORT) == []
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    startup = container["startupProbe"]
    # load, compile (the server compiles by default: minutes per graph on a CPU from a cold inductor cache) and
    # warm up, on a cold node: the server listens only once that is done
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    bad = copy.deepcopy(container)
    bad["readinessProbe"]["httpGet"]["path"] = "/healthz"
    bad["livenessProbe"]["httpGet"]["port"] = 8080
    assert probe_problems("server", bad, routes, SERVER_PORT) == [
        "server: readinessProbe path '/healthz' is not a route of the server",
        "server: livenessProbe port 8080 is 8080, the server listens on 8000"]


def test_termination_grace_outlasts_the_drain(single: list[dict[str, Any]]) -> None:
    import inspect

    from accel_diffusion.server.process import serve

    drain_s = inspect.signature(serve).parameters["drain_timeout_s"].default
    container, pod = server_container(single)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= drain_s + int(pre_stop[1]) + 10


def test_services_monitors_and_policies_select_the_server(single: list[dict[str, Any]], routes: set[str]) -> None:
    (deployment,) = named(single, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container, _ = server_container(single)
    port_names = {p["name"] for p in container["ports"]}
    (service,) = named(single, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    (monitor,) = named(single, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (components,) = monitor["spec"]["selector"]["matchExpressions"]
    assert components["key"] == "app.kubernetes.io/component" and components["operator"] == "In"
    assert service["metadata"]["labels"][components["key"]] in components["values"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] in routes
    (pdb,) = named(single, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policies = {p["metadata"]["name"]: p["spec"] for p in named(single, "NetworkPolicy")}
    server_policy = policies["accel-diffusion-server"]
    assert server_policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert server_policy["egress"] == [] and server_policy["ingress"] == [{"ports": [{"port": "http",
                                                                                      "protocol": "TCP"}]}]


def test_the_model_fill_job_fills_what_the_servers_read(single: list[dict[str, Any]]) -> None:
    """The Job downloads each hub model of the mounted models.toml, at its revision, into the servers'
    HF_HUB_CACHE on the models volume (which the servers mount read-only)."""
    from huggingface_hub.cli.hf import app as hf

    (job,) = named(single, "Job", "accel-diffusion-model-fill")
    fill = job["spec"]["template"]["spec"]["containers"][0]
    name, params = click_parse(hf, fill["args"])
    from importlib.metadata import entry_points  # the image's `hf`: huggingface_hub's script (a diffusers dependency)

    assert [e.value for e in entry_points(group="console_scripts", name="hf")] == ["huggingface_hub.cli.hf:main"]
    container, pod = server_container(single)
    files = config_files(single, pod, container)
    models = tomllib.loads(files["/etc/accel-diffusion/models.toml"])["models"]
    hub = [(m["hub_id"], m["revision"]) for m in models.values() if m["source"] == "hub"]
    assert name == "download" and hub == [(params["repo_id"], params["revision"])]
    assert re.fullmatch(r"[0-9a-f]{40}", params["revision"])
    assert "*.safetensors" in params["include"] and not any(p.endswith((".bin", ".ckpt")) for p in params["include"])
    assert params["cache_dir"] == literal_env(container)["HF_HUB_CACHE"]
    server_mount = {m["name"]: m for m in container["volumeMounts"]}["models"]
    fill_mount = {m["name"]: m for m in fill["volumeMounts"]}["models"]
    assert server_mount["readOnly"] is True and not fill_mount.get("readOnly")
    assert params["cache_dir"].startswith(server_mount["mountPath"] + "/")
    fill_claim = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["models"]
    server_claim = {v["name"]: v for v in pod["volumes"]}["models"]
    assert fill_claim["persistentVolumeClaim"]["claimName"] == server_claim["persistentVolumeClaim"]["claimName"]


def test_the_batch_job_is_indexed_over_the_shards(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from accel_diffusion.cli import main

    (job,) = named(rendered["batch"], "Job")
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    name, params = click_parse(main, container["args"])
    assert name == "batch" and spec["completionMode"] == "Indexed"
    assert params["num_shards"] == spec["completions"] and params["shard_index"] is None  # JOB_COMPLETION_INDEX
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert params["out_dir"].startswith("/outputs/") and not mounts["/outputs"].get("readOnly")
    (manifest_map,) = named(rendered["batch"], "ConfigMap")
    manifest_dir, manifest_name = params["manifest"].rsplit("/", 1)
    assert manifest_dir in mounts and manifest_name in manifest_map["data"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never" and spec["backoffLimitPerIndex"] >= 1
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [2]  # the CLI's usage-error code


def test_library_variables_are_read_by_their_libraries_and_written_paths_are_writable(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Each cache or home variable, as huggingface_hub, torch and Python resolve it in a process given the
    container's environment (paths moved under tmp_path), is the value set; and each path written to lies on
    a writable mount."""
    checked = set()
    for docs in rendered.values():
        for where, container, _ in containers(docs):
            env = literal_env(container)
            assert writable_problems(where, container, env) == []
            mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)

            def local(value: str, mounts: list[str] = mounts) -> str:
                for mount in mounts:
                    if value == mount or value.startswith(mount + "/"):
                        return str(tmp_path) + value
                return value

            library_env = {k: local(v) for k, v in env.items() if k in LIBRARY_ENV}
            for name in WRITTEN_ENV:  # the volumes' folders exist in the pod (tempfile.gettempdir() needs it)
                if name in library_env:
                    Path(library_env[name]).mkdir(parents=True, exist_ok=True)
            view = library_view(library_env)
            expected = dict(library_env)
            if "OMP_NUM_THREADS" in expected:  # torch takes it, up to the CPUs this process may use
                expected["OMP_NUM_THREADS"] = str(min(int(expected["OMP_NUM_THREADS"]), len(os.sched_getaffinity(0))))
            assert {k: view[k] for k in library_env} == expected, where
            checked |= set(library_env)
    assert checked == set(LIBRARY_ENV)
    bad = {"name": "c", "volumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}]}
    assert writable_problems("c", bad, {"HF_HOME": "/cache/hf", "TMPDIR": "/var/tmp"}) == [
        "c: TMPDIR=/var/tmp is not on a writable volume ([])", "c: HF_HOME=/cache/hf is not on a writable volume ([])"]


def test_metric_names_in_the_deploy_files_are_exported(rendered: dict[str, list[dict[str, Any]]],
                                                      tmp_path: Path) -> None:
    from accel_diffusion.server.metrics import ServerMetrics
    from accel_diffusion.server.redis_api import QueueCollector
    from accel_diffusion.server.redis_backend import RedisJobQueue
    from redis_server import RedisServer

    exported = set()
    redis_server = RedisServer(require_tool("redis-server"), tmp_path)
    redis_server.start()  # the shared queue's gauges, as a Redis-backed replica exports them
    try:
        queue = RedisJobQueue(redis_server.url)
        families = [*ServerMetrics().registry.collect(), *QueueCollector(queue, ["shapes"]).collect()]
        queue.close()
    finally:
        redis_server.stop()
    for family in families:
        exported |= {family.name} | {sample.name for sample in family.samples}
    assert "accel_diffusion_shared_queue_waiting" in exported
    texts = [yaml.safe_dump_all(docs) for docs in rendered.values()] + [(ROOT / "docs" / "deploy.md").read_text()]
    named_metrics = {name for text in texts for name in METRIC_NAME.findall(text)}
    assert named_metrics and sorted(named_metrics - exported) == []
    (monitor,) = named(rendered["overlays/single"], "ServiceMonitor")
    (relabel,) = monitor["spec"]["endpoints"][0]["metricRelabelings"]
    assert relabel["action"] == "keep" and all(re.fullmatch(relabel["regex"], name) for name in exported)


def test_resource_limits_give_torch_its_threads(single: list[dict[str, Any]]) -> None:
    container, _ = server_container(single)
    limit = container["resources"]["limits"]["cpu"]
    assert literal_env(container)["OMP_NUM_THREADS"] == str(math.ceil(float(limit)))
