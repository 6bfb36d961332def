"""Shared fixtures: offline hub, tiny random-weight pipelines saved to disk and loaded for real."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.models.registry import ModelRegistry, ModelSpec

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_STRATEGY = {"sampler": {"name": "dpmpp_2m"}, "schedule": {"name": "spacing"},
                 "guidance": {"name": "cfg", "scale": 5.0}}


def tiny_spec(model_id: str, path: Path, **extra: object) -> ModelSpec:
    return ModelSpec(id=model_id, source="local", path=str(path), default_steps=10, default_width=32,
                     default_height=32, default_strategy=TINY_STRATEGY, **extra)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_pipelines import build_tiny_sd, save

    return save(build_tiny_sd(), tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_pipelines import build_tiny_sd, save

    return save(build_tiny_sd(prediction_type="v_prediction"), tmp_path_factory.mktemp("tiny_sd_v"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_pipelines import build_tiny_sdxl, save

    return save(build_tiny_sdxl(), tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir: Path) -> LoadedPipeline:
    return load_pipeline(tiny_spec("tiny-sd", tiny_sd_dir))


@pytest.fixture(scope="session")
def tiny_registry(tiny_sd_dir: Path, tiny_sdxl_dir: Path) -> ModelRegistry:
    return ModelRegistry([tiny_spec("tiny-sd", tiny_sd_dir), tiny_spec("tiny-sdxl", tiny_sdxl_dir)])


@pytest.fixture(scope="session")
def tiny_models_file(tmp_path_factory: pytest.TempPathFactory, tiny_sd_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.toml"
    path.write_text(
        "[models.tiny]\n"
        'source = "local"\n'
        f'path = "{tiny_sd_dir}"\n'
        "default_steps = 4\ndefault_width = 32\ndefault_height = 32\n"
        'default_strategy = { sampler = { name = "ddim" }, schedule = { name = "spacing" }, '
        'guidance = { name = "cfg", scale = 5.0 } }\n'
    )
    return path


@pytest.fixture(scope="session")
def shapes_model() -> LoadedPipeline:
    """The shipped built-in `shapes` model, loaded through the default registry."""
    return ModelRegistry.default().get("shapes")


@pytest.fixture(scope="module")
def client(tiny_models_file: Path):
    """An in-process server on the tiny model (id "tiny", 32x32, 4 default steps), one per module."""
    from accel_diffusion.server import create_app
    from fastapi.testclient import TestClient
    from server_clients import make_settings

    with TestClient(create_app(make_settings(tiny_models_file))) as test_client:
        yield test_client
