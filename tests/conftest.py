"""Shared fixtures: offline hub, tiny random-weight pipelines saved to disk and loaded for real."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import shutil

import pytest
import torch

from accel_diffusion.models.loading import LoadedPipeline, load_pipeline
from accel_diffusion.models.registry import ModelRegistry, ModelSpec

# torch's thread count is process-global and changes results in the last bits (oneDNN's 1x1 convolutions round
# differently on 1 and 2 threads): every test runs at this one unless a fixture below says otherwise
SESSION_THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(SESSION_THREADS)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A test module that sets the thread count when imported sets it for every test collected with it."""
    if torch.get_num_threads() != SESSION_THREADS:
        raise pytest.UsageError(f"a test module set torch's thread count to {torch.get_num_threads()} when imported; "
                                "use the single_thread fixture (or set and restore it in a test)")


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A test that changes the thread count (a trainer's ``threads=``) leaves it as it found it."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(SESSION_THREADS)

def require_tool(name: str, *alternatives: str) -> str:
    """The path of the program ``name`` (or of the first of ``alternatives`` found). Without one the calling test is
    skipped on a user's machine, and fails under ``CI=true``: CI (``.ci/run``) installs it, so a skip there would
    hide a test that never ran."""
    for candidate in (name, *alternatives):
        if path := shutil.which(candidate):
            return path
    reason = f"needs {name!r} on PATH (Debian: apt-get install {name}; .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


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


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of the module's own on a free loopback port (tests/redis_server.py)."""
    from redis_server import RedisServer

    server = RedisServer(require_tool("redis-server"), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of searched schedules holding ``searched_fixtures.tiny_artifact()`` (``tiny-dpmpp-4``), configured
    through ``$ACCEL_DIFFUSION_SCHEDULES_DIR`` for the test. (Here, not in a tests/schedules/conftest.py: a second
    module named ``conftest`` would shadow this one for the tests that import ``require_tool`` from it.)"""
    from searched_fixtures import tiny_artifact

    from accel_diffusion.schedules.searched import SCHEDULES_DIR_ENV, use_schedules_dir

    monkeypatch.setenv(SCHEDULES_DIR_ENV, str(tmp_path))
    use_schedules_dir(None)
    tiny_artifact().save(tmp_path)
    return tmp_path
