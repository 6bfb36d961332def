"""benchmarks/gpu_checks.py, the prepared CUDA checks, in its --cpu-smoke mode: every check runs its real code path
at tiny sizes on the CPU and records the numbers the CUDA run is judged by."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_thread")  # model work on the main and the worker's thread: no spinning
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks.py"


def test_the_cpu_smoke_mode_runs_every_check_and_writes_its_numbers(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    assert gpu_checks.main(["--out", str(tmp_path), "--cpu-smoke"]) == 0
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["ok"] is True
    checks = report["checks"]
    assert set(checks) == {"batch_invariance", "oom_recovery", "fp16_generation"}
    assert all(entry["ok"] and "error" not in entry for entry in checks.values())

    for run in checks["batch_invariance"]["runs"]:
        assert run["alone_repeatable"] is True
        for size, row in run["batches"].items():
            assert row["mismatched_images"] == [] and row["max_abs_diff"] == 0.0, (run["model"], size)
            assert row["attention_run"] == "sdpa"
    assert [run["model"] for run in checks["batch_invariance"]["runs"]] == ["shapes", "random tiny UNet at 32px"]
    assert list(checks["batch_invariance"]["runs"][0]["batches"]) == ["2", "3"]

    oom = checks["oom_recovery"]
    assert oom["job"]["failed_code"] == "gpu_oom" and oom["job"]["next_job"] == "succeeded"
    assert oom["batch"]["statuses"] == ["succeeded", "succeeded"] and oom["batch"]["batch_size_used"] == [1, 1]
    assert oom["batch"]["fired"] == 1
    assert oom["stream"]["failed_code"] == "gpu_oom" and oom["stream"]["next_frame_shape"] == [32, 32, 3]
    assert oom["job"]["reserved_after"] is None  # no CUDA memory to measure here

    for run in checks["fp16_generation"]["runs"]:
        assert run["nfe_engine"] == run["nfe_diffusers"] == 4  # 2 steps x (uncond, cond)
        assert run["nans"] == {"engine": 0, "diffusers": 0}
        assert run["psnr_db"] >= 60.0 and run["max_abs_pixel_diff"] <= 1e-4, run["model"]


def test_without_cuda_the_script_says_to_use_the_cpu_smoke_mode(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full checks would run")
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    with pytest.raises(SystemExit) as exited:
        gpu_checks.main(["--out", str(tmp_path)])
    assert exited.value.code == 2
    assert "no CUDA device here; --cpu-smoke runs the checks at tiny sizes on the CPU" in capsys.readouterr().err
