"""``"strategy": "auto"`` on every surface (server routes, SDK, CLI, batch manifests) and ``bench pareto``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from accel_diffusion.clients import AccelClient, InvalidRequest
from accel_diffusion.server import create_app
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pareto_fixtures import TINY_POINTS, make_profile, write_profile
from server_clients import decode, make_settings, running_server

from accel_diffusion.batch import LocalBackend, run_batch
from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto import profile as profile_module
from accel_diffusion.pareto.profile import ParetoProfile, device_key, use_profiles_dir
from accel_diffusion.pareto.sweep import anchor_candidates
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def profiles_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("profiles")
    write_profile(folder, make_profile("tiny", device_key("cpu"), TINY_POINTS))
    mp = pytest.MonkeyPatch()
    mp.setenv(profile_module.PROFILES_DIR_ENV, str(folder))
    yield folder
    mp.undo()
    use_profiles_dir(None)


def explicit(engine: Engine, steps: int, strategy: dict, **fields) -> np.ndarray:
    request = GenerationRequest.create(model="tiny", prompt=PROMPT, seed=7, steps=steps, strategy=strategy, **fields)
    return engine.generate(request).to_uint8()


def test_server_routes_resolve_auto_echo_it_and_refuse_what_does_not_fit(profiles_dir: Path,
                                                                         tiny_models_file: Path) -> None:
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    with TestClient(create_app(make_settings(tiny_models_file, profiles_dir=profiles_dir))) as client:
        response = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 7, "strategy": "auto",
                                                               "latency_budget_ms": 45})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["strategy"]["sampler"]["name"] == "ddim" and body["strategy"]["auto"]["expected_quality"] == 0.6
        assert body["usage"]["nfe_per_image"] == 4  # 2 steps with CFG
        assert np.array_equal(decode(body["data"][0]["b64_json"]), explicit(engine, 2, TINY_POINTS[1][0])[0])

        job = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 7, "strategy": "auto",
                                            "latency_budget_ms": 1000, "min_quality": 0.5}).json()
        from server_clients import wait_finished
        done = wait_finished(client, job["id"])
        assert done["status"] == "succeeded" and done["result"]["steps"] == 3
        assert done["result"]["strategy"]["auto"]["min_quality"] == 0.5

        for extra, param, status in [({"latency_budget_ms": 5}, "latency_budget_ms", 400),
                                     ({"latency_budget_ms": 40, "min_quality": 0.95}, "min_quality", 400),
                                     ({}, "latency_budget_ms", 422),
                                     ({"latency_budget_ms": 40, "steps": 3}, "steps", 422),
                                     ({"latency_budget_ms": 40, "guidance_scale": 3}, "guidance_scale", 422)]:
            bad = client.post("/v1/images/generations", json={"prompt": PROMPT, "strategy": "auto", **extra})
            assert bad.status_code in (400, 422) and bad.json()["error"]["param"] == param, (extra, bad.text)
            assert status in (400, 422)

        front = client.get("/v1/models").json()["data"][0]["pareto_front"]
        assert front["profile"] == f"tiny@{device_key('cpu')}.json"
        assert [(p["steps"], p["quality"]) for p in front["points"]] == [(1, 0.3), (2, 0.6), (3, 0.9)]


def test_a_server_without_a_profile_refuses_auto_and_shows_no_front(tiny_models_file: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(profile_module.PROFILES_DIR_ENV, raising=False)
    with TestClient(create_app(make_settings(tiny_models_file, profiles_dir=tmp_path))) as client:
        bad = client.post("/v1/jobs", json={"prompt": PROMPT, "strategy": "auto", "latency_budget_ms": 50})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "strategy"
        assert "bench pareto --model tiny" in bad.json()["error"]["message"]
        assert client.get("/v1/models").json()["data"][0]["pareto_front"] is None
    use_profiles_dir(None)


def test_sdk_cli_and_batch_take_auto(profiles_dir: Path, tiny_models_file: Path, tmp_path: Path) -> None:
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    want = explicit(engine, 1, TINY_POINTS[0][0])[0]
    with running_server(create_app(make_settings(tiny_models_file, profiles_dir=profiles_dir))) as (_, _, base), \
            AccelClient(base, timeout=60) as sdk:
        output = sdk.generate(PROMPT, seed=7, strategy="auto", latency_budget_ms=15)
        assert output.strategy["auto"]["expected_latency_ms"] == 10.0
        assert np.array_equal(np.asarray(output.images[0]), want)
        with pytest.raises(InvalidRequest, match="latency_budget_ms"):
            sdk.generate(PROMPT, strategy="auto", latency_budget_ms=1)

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", PROMPT,
                                       "--seed", "7", "--strategy", "auto", "--latency-budget-ms", "15",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["runs"][0]["strategy"]["auto"]["latency_budget_ms"] == 15
    result = CliRunner().invoke(main, ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", PROMPT,
                                       "--strategy", "auto", "--out", str(out)])
    assert result.exit_code != 0 and "latency_budget_ms" in result.output

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"model": "tiny", "prompt": PROMPT, "seed": 7, "strategy": "auto",
                                    "latency_budget_ms": 15, "id": "a"}) + "\n")
    report = run_batch(manifest, tmp_path / "batch", LocalBackend(tiny_models_file), progress=False)
    assert report.ok and report.generated == 1
    record = json.loads(next((tmp_path / "batch" / "results").iterdir()).read_text())
    assert record["strategy"]["auto"]["expected_quality"] == 0.3


def test_bench_pareto_writes_a_profile_and_a_plot_and_resumes(tiny_models_file: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "tiny@cpu.json", tmp_path / "front.png"
    args = ["--models", str(tiny_models_file), "bench", "pareto", "--model", "tiny", "--out", str(out), "--steps",
            "1,2", "--images", "4", "--repeats", "1", "--batch-size", "2", "--no-searched", "--plot", str(plot)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    profile = ParetoProfile.load(out)
    assert profile.complete and profile.model == "tiny" and profile.device == device_key("cpu")
    assert len(profile.points) + len(profile.skipped) == 18 + 3  # 9 families x 2 step counts + 3 anchors
    spec = ModelRegistry.from_file(tiny_models_file).spec("tiny")
    anchors = anchor_candidates("tiny", spec.default_strategy.model_dump(exclude_none=True), spec.default_steps)
    assert {c.key() for _, c in anchors} <= {p.key() for p in profile.points}  # measured, never pruned
    assert profile.front and all(p.nfe in (1, 2, 4) for p in profile.points if p.steps <= 2)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and ParetoProfile.load(out).points == profile.points  # resumed: nothing re-measured


def test_an_api_replica_resolves_auto_with_the_workers_device_key(profiles_dir: Path, tiny_models_file: Path,
                                                                  redis_url: str) -> None:
    """Redis scale-out: the API replica (no model loaded) resolves against profile_device and queues the concrete
    strategy; a worker replica runs it. Without profile_device the API replica refuses with a 400."""
    base = {"queue_backend": "redis", "redis_url": redis_url, "redis_prefix": "auto", "profiles_dir": profiles_dir}
    with TestClient(create_app(make_settings(tiny_models_file, role="api", **base))) as bare:
        refused = bare.post("/v1/jobs", json={"prompt": PROMPT, "strategy": "auto", "latency_budget_ms": 15})
        assert refused.status_code == 400 and "profile_device" in refused.json()["error"]["message"]
    api = make_settings(tiny_models_file, role="api", profile_device=device_key("cpu"), **base)
    worker = make_settings(tiny_models_file, role="worker", **base)
    with TestClient(create_app(worker)), TestClient(create_app(api)) as client:
        job = client.post("/v1/jobs", json={"prompt": PROMPT, "seed": 7, "strategy": "auto",
                                            "latency_budget_ms": 15}).json()
        assert job["request"]["strategy"]["auto"]["expected_quality"] == 0.3  # queued concrete
        from server_clients import wait_finished
        done = wait_finished(client, job["id"], timeout=90)
        assert done["status"] == "succeeded" and done["result"]["nfe"] == 1
