"""The examples in clients/examples run against a real server, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accel_diffusion.server import create_app
from conftest import require_tool
from fastapi import FastAPI
from PIL import Image
from server_clients import make_settings, running_server

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "examples"


@pytest.fixture(scope="module")
def server_app(tiny_models_file: Path) -> FastAPI:
    return create_app(make_settings(tiny_models_file))


@pytest.fixture(scope="module")
def server_url(server_app: FastAPI) -> Iterator[str]:
    with running_server(server_app) as (_, _, url):
        yield url


def run(command: list[str], url: str, threads: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACCEL_DIFFUSION_URL": url, "HF_HUB_OFFLINE": "1"}
    if threads is not None:  # torch's thread count in the subprocess (torch reads it at start-up)
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def assert_images(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (32, 32)


def test_sdk_example(server_url: str, tmp_path: Path) -> None:
    done = run([sys.executable, str(EXAMPLES / "sdk_generate.py"), str(tmp_path)], server_url)
    assert "seeds [7, 8]" in done.stdout and "job.completed" in done.stdout
    assert_images([tmp_path / "circle-0.png", tmp_path / "circle-1.png", tmp_path / "cross-0.png"])


def test_openai_example(server_url: str, tmp_path: Path) -> None:
    run([sys.executable, str(EXAMPLES / "openai_generate.py"), str(tmp_path)], server_url)
    assert_images([tmp_path / "triangle-0.png", tmp_path / "triangle-1.png"])


def test_curl_example(server_url: str, tmp_path: Path) -> None:
    require_tool("curl")
    require_tool("jq")
    done = run(["bash", str(EXAMPLES / "curl_generate.sh"), str(tmp_path)], server_url)
    assert done.stdout.splitlines()[1:-1] == ["event: job.queued", "event: job.started"] + [
        "event: job.progress"] * 4 + ["event: job.completed"]
    assert_images([tmp_path / "square.png", tmp_path / "cross.png"])


def test_batch_manifest_example_locally_and_through_the_server(server_app: FastAPI, server_url: str, tmp_path: Path,
                                                               tiny_models_file: Path) -> None:
    """The same bytes locally and through the server, as the README promises for runs on the same device with the
    same torch thread count: the local run gets the server worker's count, whatever this process runs at."""
    worker_threads = server_app.state.server.worker.run_soon(torch.get_num_threads).result(timeout=60)
    manifest = str(EXAMPLES / "batch_manifest.jsonl")
    cli = [sys.executable, "-m", "accel_diffusion.cli", "--models", str(tiny_models_file), "batch", manifest, "--quiet"]
    run([*cli, "--out", str(tmp_path / "local")], server_url, threads=worker_threads)
    run([*cli, "--server", server_url, "--concurrency", "2", "--out", str(tmp_path / "server")], server_url)
    for out in ("local", "server"):
        records = [json.loads(line) for line in (tmp_path / out / "results.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == ["circle", "cross", "triangle", "square-jpeg"]
        assert records[1]["strategy"]["sampler"]["name"] == "deis" and records[3]["files"][0].endswith(".jpg")
    local_images = sorted((tmp_path / "local" / "images").iterdir())
    assert len(local_images) == 5
    assert [p.read_bytes() for p in local_images] == [
        p.read_bytes() for p in sorted((tmp_path / "server" / "images").iterdir())]
