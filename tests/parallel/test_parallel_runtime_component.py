"""The ``runtime`` component ``patch_parallel`` and ``torchrun -m accel_diffusion.parallel generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accel_diffusion.engine import Engine
from accel_diffusion.errors import IncompatibleStrategyError, InvalidRequestError
from accel_diffusion.strategy import GenerationRequest, Strategy

PROMPT = "a red circle on a blue background"


def test_strategy_runtime_validates_at_the_edge() -> None:
    strategy = Strategy.parse({"runtime": {"name": "patch_parallel", "mode": "pcpp", "rho": 0.25}})
    assert strategy.runtime == {"name": "patch_parallel", "mode": "pcpp", "warmup_steps": 4, "rho": 0.25}
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"runtime": {"name": "patch_parallel", "mode": "ring"}})
    assert err.value.field.startswith("strategy.runtime.mode")
    with pytest.raises(InvalidRequestError) as err:
        Strategy.parse({"runtime": {"name": "patch_parallel", "rho": 0}})
    assert err.value.field.startswith("strategy.runtime.rho")


def test_runtime_outside_torchrun_is_refused_with_how_to_start_it() -> None:
    request = GenerationRequest.create(prompt=PROMPT, seed=1, steps=2,
                                       strategy={"runtime": {"name": "patch_parallel"}})
    with pytest.raises(IncompatibleStrategyError) as err:
        Engine().generate(request)
    assert err.value.field == "strategy.runtime"
    assert "torchrun --nproc_per_node N -m accel_diffusion.parallel generate" in err.value.message


def _torchrun(out: Path, mode: str) -> dict[str, object]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "accel_diffusion.parallel",
               "generate", "-p", PROMPT, "--seed", "3", "--width", "64", "--height", "64", "--steps", "10",
               "--mode", mode, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_torchrun_full_sync_gives_the_single_process_image(tmp_path: Path) -> None:
    """2 gloo ranks, shapes at 64 x 64 (8 x 8 latent), 10 steps: the PNG equals the one-process engine's."""
    results = _torchrun(tmp_path, "full_sync")
    run = results["runs"][0]
    assert run["nfe"] == 20 and run["strategy"]["runtime"]["mode"] == "full_sync"
    communication = run["communication"]
    assert [c["rank"] for c in communication] == [0, 1]
    # every step moves the same bytes on both ranks (all-gathers), none of them zero
    per_step = {tuple(c["bytes_sent_per_step"]) for c in communication}
    assert len(per_step) == 1 and len(set(next(iter(per_step)))) == 1 and next(iter(per_step))[0] > 0
    parallel = np.asarray(Image.open(tmp_path / "0000_seed3.png")).astype(int)
    single = Engine().generate(GenerationRequest.create(prompt=PROMPT, seed=3, width=64, height=64, steps=10))
    assert np.abs(parallel - single.to_uint8()[0].astype(int)).max() <= 1
