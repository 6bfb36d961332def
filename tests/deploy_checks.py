"""What the deployment files (deploy/) must agree with in the code, as functions the deploy tests share.

Each check returns a list of problems (empty: none), naming the object, the container and the field, so a test can
show that a misspelled setting, an unknown flag or a probe on a route the server does not serve is caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32"  # the oldest minor the manifests target (kubectl here embeds kustomize v5.5.0)
SERVER_ENV_PREFIX = "ACCEL_DIFFUSION_"

# Environment variables other than the server's settings, each with the program that reads it. What each resolves
# to in its library is checked by library_view(); the batch CLI's own two are read by accel_diffusion/cli.py.
LIBRARY_ENV = ("HOME", "TMPDIR", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TORCHINDUCTOR_CACHE_DIR",
               "TRITON_CACHE_DIR", "OMP_NUM_THREADS")
BATCH_ENV = ("JOB_COMPLETION_INDEX", "ACCEL_DIFFUSION_NUM_SHARDS")
# paths a library writes into (they must lie on a writable volume under readOnlyRootFilesystem)
WRITTEN_ENV = ("HOME", "TMPDIR", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def kustomizations() -> list[Path]:
    """Every folder under deploy/k8s that kustomize renders on its own (the base is rendered by its overlays)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml") if p.parent.name != "base")


def render(kustomization: Path, kubectl: str = "kubectl") -> list[dict[str, Any]]:
    done = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def named(docs: list[dict[str, Any]], kind: str, name_prefix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``Kind/name``, pod spec) of every workload."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(``Kind/name/container``, container, its pod spec) of every container and init container."""
    for where, pod in pod_specs(docs):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{container['name']}", container, pod


def config_files(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The files a container sees from its ConfigMap volumes: mount path + key -> text."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # absent: a StatefulSet's volumeClaimTemplates
        if "configMap" in volume:
            for key, text in maps[volume["configMap"]["name"]].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return files


# ---- commands -----------------------------------------------------------------------------------------------

def click_parse(group: click.Group, argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``argv`` with a click group's real parser, as the program would: (subcommand, its parameters).
    Path arguments that must exist are checked only by the program itself (they are paths in the pod)."""
    ctx = group.make_context(group.name or "cli", list(argv), resilient_parsing=False)
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    assert command is not None and name is not None
    with _paths_unchecked():
        sub = command.make_context(name, rest, parent=ctx)
    return name, sub.params


@contextlib.contextmanager
def _paths_unchecked() -> Iterator[None]:
    """click.Path(exists=True) checks the local disk; a manifest names paths inside the container."""
    saved = click.Path.convert

    def convert(path_type: click.Path, value: Any, param: Any, ctx: Any) -> Any:
        exists, path_type.exists = path_type.exists, False
        try:
            return saved(path_type, value, param, ctx)
        finally:
            path_type.exists = exists

    click.Path.convert = convert  # type: ignore[method-assign]
    try:
        yield
    finally:
        click.Path.convert = saved  # type: ignore[method-assign]


def command_problems(where: str, argv: list[str]) -> list[str]:
    """The container's command parsed by the real CLI it names: ``accel-diffusion`` (accel_diffusion.cli) or
    ``hf`` (huggingface_hub's CLI, for the model-fill Job)."""
    if not argv:
        return [f"{where}: no command (the image's entrypoint would run; spell it out)"]
    if argv[0] == "accel-diffusion":
        from accel_diffusion.cli import main as group
    elif argv[0] == "hf":
        from huggingface_hub.cli.hf import app as group
    elif argv[0] == "redis-server":  # no parser to call: tests/deploy/test_k8s_cpu_local.py runs it, config and all
        return []
    elif argv[0] == "torchrun":  # the multi-rank server: torchrun's options, then `-m accel_diffusion.cli ...`
        parsed = torchrun_parse(argv[1:])
        if parsed is None or not parsed.module or parsed.training_script != "accel_diffusion.cli":
            return [f"{where}: {shlex.join(argv)}: not torchrun [options] -m accel_diffusion.cli ..."]
        return command_problems(where, ["accel-diffusion", *parsed.training_script_args])
    else:
        return [f"{where}: command {argv[0]!r} is not accel-diffusion, hf, torchrun or redis-server"]
    try:
        click_parse(group, argv[1:])
    except click.ClickException as exc:
        return [f"{where}: {shlex.join(argv)}: {exc.format_message()}"]
    return []


def torchrun_parse(args: list[str]) -> Any:
    """torchrun's own argument parser (torch.distributed.run) on ``args``; None when it refuses them."""
    from torch.distributed.run import get_args_parser

    try:
        return get_args_parser().parse_args(args)
    except SystemExit:
        return None


# ---- settings and environment -------------------------------------------------------------------------------

def setting_names() -> set[str]:
    from accel_diffusion.server import ServerSettings

    return set(ServerSettings.model_fields)


def server_config_problems(where: str, toml_text: str) -> list[str]:
    """A server.toml's keys are ServerSettings fields, and the server accepts the file."""
    from accel_diffusion.server import ServerSettings

    data = tomllib.loads(toml_text)
    values = data.get("server", data)
    problems = [f"{where}: {key!r} is not a server setting (server/settings.py ServerSettings)"
                for key in values if key not in setting_names()]
    if not problems:
        try:  # the values too, as `serve --config` reads them (the files named are read later, in the pod)
            ServerSettings.model_validate(values)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def env_problems(where: str, container: dict[str, Any]) -> list[str]:
    """Every environment variable is a server setting (ACCEL_DIFFUSION_<FIELD>), the model registry's
    ACCEL_DIFFUSION_MODELS, the batch CLI's, or one a library reads (LIBRARY_ENV)."""
    from accel_diffusion.models.registry import MODELS_FILE_ENV

    known = {SERVER_ENV_PREFIX + name.upper() for name in setting_names()} | {MODELS_FILE_ENV}
    known |= set(LIBRARY_ENV) | set(BATCH_ENV)
    known |= expanded_names(container)
    problems = []
    for var in container.get("env", []):
        if var["name"] not in known:
            close = [k for k in sorted(known) if _similar(k, var["name"])]
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(f"{where}: env {var['name']} is read by nothing (not a server setting, the model "
                            f"registry's, the batch CLI's, a library's or expanded by the kubelet){hint}")
    for source in container.get("envFrom", []):
        problems.append(f"{where}: envFrom {source}: list variables by name so each is checked")
    return problems


EXPANSION = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expanded_names(container: dict[str, Any]) -> set[str]:
    """Variables the kubelet expands, as ``$(NAME)``, into another variable's value, the command or the args."""
    texts = [v.get("value", "") for v in container.get("env", [])] + container.get("command", []) + \
        container.get("args", [])
    return {name for text in texts for name in EXPANSION.findall(text)}


def expand(text: str, values: dict[str, str]) -> str:
    """``$(NAME)`` replaced as the kubelet does (a name it does not know stays as written)."""
    return EXPANSION.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() > 0.85


def literal_env(container: dict[str, Any], resource_values: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment with literal values; resourceFieldRef values from ``resource_values``
    (``limits.cpu`` -> the number the kubelet gives: the limit rounded up to whole cores, divisor 1)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "resourceFieldRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["resourceFieldRef"]
            limit = container["resources"]["limits"][ref["resource"].split(".", 1)[1]]
            env[var["name"]] = str(-(-_quantity(limit) // _quantity(ref.get("divisor", "1"))))
    return env


def _quantity(text: str | int) -> int:
    """A CPU quantity in millicores."""
    text = str(text)
    return int(text[:-1]) if text.endswith("m") else int(float(text) * 1000)


LIBRARY_VIEW = r"""
import json, os, pathlib, tempfile
import huggingface_hub.constants as hf
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
print(json.dumps({"HOME": str(pathlib.Path.home()), "TMPDIR": tempfile.gettempdir(), "HF_HOME": hf.HF_HOME,
                  "HF_HUB_CACHE": hf.HF_HUB_CACHE, "HF_HUB_OFFLINE": "1" if hf.HF_HUB_OFFLINE else "0",
                  "TORCHINDUCTOR_CACHE_DIR": cache_dir(), "TRITON_CACHE_DIR": triton_cache_dir(0),
                  "OMP_NUM_THREADS": str(torch.get_num_threads())}))
"""


def library_view(env: dict[str, str]) -> dict[str, str]:
    """What huggingface_hub, torch and Python resolve from ``env``: each LIBRARY_ENV variable as its library
    sees it (a variable a library does not read would show its default instead)."""
    base = {k: v for k, v in os.environ.items() if k not in LIBRARY_ENV and not k.startswith("HF_")}
    done = subprocess.run([sys.executable, "-c", LIBRARY_VIEW], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def writable_problems(where: str, container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Under readOnlyRootFilesystem, each path a library writes to lies on a writable volume mount."""
    writable = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
    problems = []
    for name in WRITTEN_ENV:
        if name in env and not any(env[name] == m or env[name].startswith(m.rstrip("/") + "/") for m in writable):
            problems.append(f"{where}: {name}={env[name]} is not on a writable volume ({writable})")
    return problems


# ---- routes and metrics -------------------------------------------------------------------------------------

def server_routes() -> set[str]:
    """The paths the server answers GET on (its OpenAPI document)."""
    from accel_diffusion.server import ServerSettings, create_app

    paths = create_app(ServerSettings()).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def probe_problems(where: str, container: dict[str, Any], routes: set[str], port: int) -> list[str]:
    """startup, readiness and liveness probes are GETs on routes the server serves, on its port."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            problems.append(f"{where}: no {kind}")
            continue
        get = probe.get("httpGet", {})
        if get.get("path") not in routes:
            problems.append(f"{where}: {kind} path {get.get('path')!r} is not a route of the server")
        probe_port = ports.get(get.get("port"), get.get("port"))
        if probe_port != port:
            problems.append(f"{where}: {kind} port {get.get('port')!r} is {probe_port}, the server listens on {port}")
    return problems


METRIC_NAME = re.compile(r"\baccel_diffusion_[a-z_]+\b")


def lay_out_pod(docs: list[dict[str, Any]], pod: dict[str, Any], container: dict[str, Any],
                root: Path) -> Callable[[str], str]:
    """Make the container's volume mounts as folders under ``root`` (ConfigMap files written, paths in them
    moved too) and return the function that moves a path in the pod, within any text, to its place here."""
    mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)
    in_pod = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, mounts)) + r")(?![\w.-])")

    def local(text: str) -> str:
        return in_pod.sub(lambda m: f"{root}{m.group(1)}", text)

    for mount in mounts:
        (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for path, text in config_files(docs, pod, container).items():
        Path(local(path)).write_text(local(text))
    return local


def pod_env(container: dict[str, Any], local: Callable[[str], str]) -> dict[str, str]:
    """This process's environment without the server's and the hub's variables, plus the container's (paths
    moved by ``local``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCEL_DIFFUSION_", "HF_"))}
    return env | {name: local(value) for name, value in literal_env(container).items()}
