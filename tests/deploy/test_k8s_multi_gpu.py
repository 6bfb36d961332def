"""The multi-gpu overlay (deploy/k8s/overlays/multi-gpu) agrees with the multi-rank server: torchrun starts one rank
per GPU the pod gets, its command parses with torchrun's and accel-diffusion's real parsers (tests/deploy/test_k8s.py
renders and validates every overlay), the ranks share a memory-backed /dev/shm, and the settings it sets are read."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from conftest import require_tool
from deploy_checks import K8S, click_parse, command_problems, config_files, render, torchrun_parse


@pytest.fixture(scope="module")
def server() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], dict[str, Any]]:
    docs = render(K8S / "overlays" / "multi-gpu", require_tool("kubectl"))
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return docs, deployment, pod, container


def test_one_rank_per_gpu_under_torchrun(server: tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any],
                                                         dict[str, Any]]) -> None:
    _, deployment, pod, container = server
    assert container["command"] == ["torchrun"]
    parsed = torchrun_parse(container["args"])
    assert parsed.standalone and parsed.module and parsed.training_script == "accel_diffusion.cli"
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert parsed.nproc_per_node == gpus == container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert parsed.max_restarts == 0, "a dead rank ends the pod's ranks; the kubelet restarts the container"
    assert parsed.training_script_args[:3] == ["serve", "--role", "all"]
    assert container["image"].endswith(":0.1.0-cuda")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
    assert shm["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_the_command_and_settings_are_the_servers(server: tuple[list[dict[str, Any]], dict[str, Any],
                                                                dict[str, Any], dict[str, Any]]) -> None:
    from accel_diffusion.server import ServerSettings

    from accel_diffusion.cli import main

    docs, _, pod, container = server
    argv = container["command"] + container["args"]
    assert command_problems("Deployment/multi-gpu/server", argv) == []
    broken = [*argv[:-2], "--confg", argv[-1]]
    assert command_problems("d", broken)[0].startswith("d: accel-diffusion serve --role all --confg")
    assert command_problems("d", ["torchrun", "--nproc-per-node", "4", "serve.py"])[0].endswith(
        "not torchrun [options] -m accel_diffusion.cli ...")
    _, params = click_parse(main, torchrun_parse(container["args"]).training_script_args)
    files = config_files(docs, pod, container)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = ServerSettings.model_validate({**tomllib.loads(files[params["config_file"]])["server"],
                                              "parallel_mode": env["ACCEL_DIFFUSION_PARALLEL_MODE"]})
    assert settings.parallel_mode == "distrifusion" and settings.queue_backend == "memory"
    assert settings.port == 8000
