"""The README's claims that code can check: every HTTP route is in its route table, the SSE event names are
the server's, and a Python snippet that imports a package outside the dependencies says how to install it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _normalized(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_http_route_is_in_the_route_table() -> None:
    from accel_diffusion.server import ServerSettings, create_app

    table = "\n".join(line for line in README.splitlines() if line.startswith("| `"))
    documented = {_normalized(path) for path in re.findall(r"`(?:[A-Z]+ )?(/[^`\s\[]*)", table)}
    routes = {_normalized(path) for path in create_app(ServerSettings()).openapi()["paths"]}
    assert sorted(routes - documented) == []


def test_sse_event_names_are_the_servers() -> None:
    emitted = set()
    for source in (ROOT / "server").glob("*.py"):
        emitted |= set(re.findall(r"\"(job\.[a-z]+)\"", source.read_text()))
    assert emitted == {"job.queued", "job.started", "job.progress", "job.preview", "job.completed", "job.failed",
                       "job.cancelled"}
    assert [name for name in sorted(emitted) if name not in README] == []
    assert "SSE: queued" not in README


def test_python_snippets_say_how_to_install_what_they_import() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {"accel_diffusion"} | {re.split(r"[<>=\[ ]", dep)[0].replace("-", "_").lower()
                                       for dep in project["dependencies"]}
    snippets = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(snippets) >= 4
    for snippet in snippets:
        imported = set()
        for node in ast.walk(ast.parse(snippet)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        extra = sorted(imported - installed)
        assert not extra or "pip install" in snippet, (extra, snippet[:200])
