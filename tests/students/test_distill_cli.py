"""``accel-diffusion distill``: a gmm student directory with its card, loadable like any model; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.models.gmm import GmmPipeline
from accel_diffusion.students.distill import STATE_DIR

pytestmark = pytest.mark.usefixtures("single_thread")  # small MLPs: one thread is fastest, and fair


def test_distill_fdistill_gmm_writes_a_loadable_student(tmp_path: Path) -> None:
    out = tmp_path / "gmm_fdistill"
    result = CliRunner().invoke(main, ["distill", "--method", "fdistill", "--teacher", "gmm", "--out", str(out),
                                       "--iterations", "30", "--seed", "2", "--divergence", "kl"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout[result.stdout.index('{\n  "'):])
    assert info["iterations"] == 30 and info["resumed_from"] == 0 and info["quality"]["mmd"] > 0
    card = json.loads((out / "training_info.json").read_text())
    assert card["command"] == (f"accel-diffusion distill --method fdistill --teacher gmm --out {out} "
                               "--iterations 30 --seed 2 --divergence kl")
    assert card["recipe"]["method"]["divergence"] == "kl" and card["recipe"]["train"]["iterations"] == 30
    assert [h["iteration"] for h in card["recipe"]["history"]] == [6, 12, 18, 24, 30]
    assert card["quality"] == info["quality"] and not (out / STATE_DIR).exists()
    pipe = GmmPipeline.from_pretrained(str(out))
    samples = pipe(batch_size=8, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).samples
    assert samples.shape == (8, 2)


def test_distill_refuses_an_unknown_teacher(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["distill", "--method", "fdistill", "--teacher", "sdxl", "--out",
                                       str(tmp_path / "x")])
    assert result.exit_code == 2 and "teacher" in result.output and "'gmm'" in result.output, result.output
    result = CliRunner().invoke(main, ["distill", "--method", "fdistill", "--divergence", "tv", "--out",
                                       str(tmp_path / "x")])
    assert result.exit_code == 2 and "divergence" in result.output and "'js'" in result.output, result.output


def test_distill_slimflow_gmm_writes_a_flow_student(tmp_path: Path) -> None:
    from accel_diffusion.students.slimflow import FlowGenerator

    out = tmp_path / "gmm_slimflow"
    result = CliRunner().invoke(main, ["distill", "--method", "slimflow", "--out", str(out), "--iterations", "30"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "training_info.json").read_text())
    recipe = card["recipe"]["method"]
    assert recipe["reflow_iterations"] == 30 and recipe["distillation_iterations"] == 10
    assert json.loads((out / "model_index.json").read_text())["denoiser"] == ["accel_diffusion.students.slimflow",
                                                                             "FlowGenerator"]
    plain = FlowGenerator.from_pretrained(str(out / "denoiser"))
    pipe = GmmPipeline.from_pretrained(str(out))
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = pipe(num_inference_steps=1, latents=z, output_type="pt").samples
    assert torch.equal(samples, plain(z.float()).sample.double()) and not (out / STATE_DIR).exists()
