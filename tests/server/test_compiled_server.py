"""engine_acceleration = "compile" on the server: buckets built at startup, before readiness; requests
then run the built graphs (no compile on a request) and return the eager engine's images."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from accel_diffusion.server import ServerSettings, create_app
from fastapi.testclient import TestClient
from server_clients import decode, make_settings
from torch._dynamo.utils import counters

from accel_diffusion.engine import Engine, compiled
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a red circle on a blue background"


def test_the_server_builds_its_buckets_before_it_is_ready_and_requests_use_them(
        tiny_models_file: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tiny_models_file, engine_acceleration="compile", compile_buckets=[2])
    assert settings.stream_acceleration_used == "compile"  # the stream follows the engine's word
    # a uvicorn run earlier in the process configured the server's logger not to propagate (process.py)
    monkeypatch.setattr(logging.getLogger("accel_diffusion.server"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="accel_diffusion"), \
            caplog.at_level(logging.INFO, logger="accel_diffusion.server"), TestClient(create_app(settings)) as client:
        lines = [r.getMessage() for r in caplog.records]
        built = [line for line in lines if line.startswith("compiled tiny ")]
        assert [line.split(" in ")[0] for line in built] == [
            "compiled tiny unet graph of 2 rows", "compiled tiny decode:AutoencoderKL graph of 2 rows"]
        summary = next(i for i, line in enumerate(lines) if line.startswith("compiled tiny's 1 buckets in"))
        # the graphs first, then the warm-up generation (on the built graphs), then ready
        warming = next(i for i, line in enumerate(lines) if line.startswith("warming up tiny"))
        assert summary < warming < next(i for i, line in enumerate(lines) if line.startswith("ready in"))
        assert client.get("/health/ready").status_code == 200
        graphs = counters["stats"]["unique_graphs"]
        model = client.app.state.server.registry.get("tiny")
        stats = model.compiled_model().unet.stats
        # no graph built twice, none of the buckets' in the background (the warm-up ran on built graphs)
        for call in model.compiled_model().calls():
            assert len(call.stats.builds) == len(call.ready), (call.name, call.stats.builds)
        assert [(b["rows"], b["background"]) for b in stats.builds] == [(2, False)]
        assert stats.eager_calls == 0 and stats.compiled_calls >= 1  # the warm-up generation: compiled
        eager_calls = stats.eager_calls
        response = client.post("/v1/images/generations", json={
            "prompt": PROMPT, "size": "32x32", "seed": 5, "num_inference_steps": 3, "guidance_scale": 4.0})
        assert response.status_code == 200, response.text
        images = np.stack([decode(d["b64_json"]) for d in response.json()["data"]])
        assert counters["stats"]["unique_graphs"] == graphs  # no compile on the request
        assert stats.eager_calls == eager_calls and stats.compiled_calls >= 3
    expected = Engine(ModelRegistry.from_file(tiny_models_file)).generate(GenerationRequest.create(
        model="tiny", prompt=PROMPT, seed=5, steps=3, width=32, height=32,
        strategy={"guidance": {"name": "cfg", "scale": 4.0}}), batch_invariant=True).to_uint8()
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_the_inductor_cache_directory_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """inductor_cache_dir becomes TORCHINDUCTOR_CACHE_DIR, which inductor reads at its first compile in a
    process (the server sets it before loading any model); cold vs warm starts: docs/benchmarks.md."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "before")  # restored after the test
    compiled.set_cache_dir(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor") and (tmp_path / "inductor").is_dir()
    assert ServerSettings(inductor_cache_dir=tmp_path).inductor_cache_dir == tmp_path


def test_the_acceleration_settings() -> None:
    """Unset engine_acceleration is resolved from the served models' devices: compile on CPU and CUDA (where
    it measured faster), none elsewhere or where a device is of another kind; a value set is kept."""
    assert ServerSettings().engine_acceleration is None and ServerSettings().stream_acceleration_used == "none"
    assert ServerSettings(stream_acceleration="compile").stream_acceleration_used == "compile"
    for devices, expected in ((["cpu"], "compile"), (["cuda", "cuda"], "compile"), (["mps"], "none"),
                              (["cpu", "mps"], "none"), ([], "none")):
        resolved = ServerSettings().resolve_acceleration(devices)
        assert (resolved.engine_acceleration, resolved.stream_acceleration_used) == (expected, expected), devices
    assert ServerSettings(engine_acceleration="none").resolve_acceleration(["cpu"]).engine_acceleration == "none"
    eager_stream = ServerSettings(stream_acceleration="none").resolve_acceleration(["cpu"])
    assert (eager_stream.engine_acceleration, eager_stream.stream_acceleration_used) == ("compile", "none")
    with pytest.raises(ValueError, match="engine_acceleration"):
        ServerSettings(engine_acceleration="tensorrt")
    with pytest.raises(ValueError, match="compile_buckets"):
        ServerSettings(compile_buckets=[0])


def test_serve_compiles_by_default_on_a_cpu_and_not_under_a_patch_parallel_group(tiny_models_file: Path) -> None:
    """What ``accel-diffusion serve`` runs with no acceleration setting: the server's state resolves it (no
    model is loaded and nothing compiled here: the worker is not started)."""
    from accel_diffusion.server.app import ServerState, served_registry

    settings = make_settings(tiny_models_file, engine_acceleration=None)  # the helper pins "none"
    assert settings.engine_acceleration is None
    state = ServerState(settings, served_registry(settings))
    assert state.settings.engine_acceleration == "compile" and state.worker.engine.acceleration == "compile"
    assert state.settings.stream_acceleration_used == "compile" and not state.registry._loaded
    on_mps = ServerState(make_settings(tiny_models_file, engine_acceleration=None, device="mps"),
                         served_registry(make_settings(tiny_models_file, device="mps")))
    assert on_mps.settings.engine_acceleration == "none"
    group = SimpleNamespace(settings=settings, lost=None)  # rank 0 of a patch-parallel group: eager
    assert ServerState(settings, served_registry(settings), ranks=group).settings.engine_acceleration == "none"
