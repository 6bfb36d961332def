"""CI does not silently skip: `.ci/run` installs the tools the tests need, and under CI=true a missing one fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

REPO = Path(__file__).resolve().parents[1]
README_COMMAND = ('python3 -m pip install -q torch==2.13.0 && python3 -m pip install -q -e ".[dev]" && '
                  "HF_HUB_OFFLINE=1 python3 -m pytest -q -p no:cacheprovider")


def test_require_tool_skips_on_a_users_machine_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("no-such-tool-25", "bash") == shutil.which("bash")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs 'no-such-tool-25' on PATH"):
        require_tool("no-such-tool-25")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: needs 'no-such-tool-25' on PATH"):
        require_tool("no-such-tool-25")


def stub_path(tmp_path: Path, apt_get_status: int) -> Path:
    """A PATH without chromium, curl, jq, kubectl or redis-server: apt-get and python3 record their arguments,
    apt-get exits as told."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    scripts = {"id": "echo 0", "apt-get": f'echo "apt-get $*" >> {tmp_path}/calls; exit {apt_get_status}',
               "python3": f'echo "python3 $*" >> {tmp_path}/calls'}
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_ci(tmp_path: Path, apt_get_status: int, ci: str | None) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {"PATH": str(stub_path(tmp_path, apt_get_status)), "HOME": str(tmp_path)} | ({"CI": ci} if ci else {})
    done = subprocess.run([shutil.which("bash"), str(REPO / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60)
    calls = tmp_path / "calls"
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_ci_run_installs_chromium_curl_and_jq_then_runs_the_readme_command(tmp_path: Path) -> None:
    done, calls = run_ci(tmp_path, apt_get_status=0, ci="true")
    assert done.returncode == 0, done.stderr
    assert calls == ["apt-get install -y -q --no-install-recommends chromium curl jq kubectl redis-server",
                     "python3 -m pip install -q torch==2.13.0", "python3 -m pip install -q -e .[dev]",
                     "python3 -m pytest -q -p no:cacheprovider"]
    assert README_COMMAND in (REPO / ".ci" / "run").read_text()
    assert README_COMMAND in (REPO / "README.md").read_text()


def test_ci_run_fails_under_ci_when_the_install_fails(tmp_path: Path) -> None:
    done, calls = run_ci(tmp_path, apt_get_status=100, ci="true")
    assert done.returncode == 1
    assert "CI=true: could not install chromium curl jq kubectl redis-server" in done.stderr
    assert calls == ["apt-get install -y -q --no-install-recommends chromium curl jq kubectl redis-server",
                     "apt-get update -q"]


def test_ci_run_on_a_users_machine_goes_on_without_the_tools(tmp_path: Path) -> None:
    done, calls = run_ci(tmp_path, apt_get_status=100, ci=None)
    assert done.returncode == 0
    assert "chromium curl jq kubectl redis-server not installed: the tests that need them are skipped" in done.stderr
    assert calls[-1] == "python3 -m pytest -q -p no:cacheprovider"

