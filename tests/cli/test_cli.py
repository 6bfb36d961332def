"""The accel-diffusion command: generate writes images + results.json, bad input writes nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from accel_diffusion.cli import main


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def test_generate_writes_images_and_results(runner: CliRunner, tiny_models_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(main, [
        "--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a red circle on a blue background",
        "-p", "a cross", "-n", "2", "--seed", "5", "--steps", "3", "--out", str(out), "--batch-size", "3",
        "--sampler", '{"name": "ddim", "eta": 0.0}', "--guidance-scale", "4",
    ])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000_seed5.png", "0001_seed6.png", "0002_seed7.png", "0003_seed8.png", "results.json"]
    summary = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in summary["images"]] == [5, 6, 7, 8]
    assert [r["prompt"] for r in summary["images"]][1:3] == ["a red circle on a blue background", "a cross"]
    run = summary["runs"][0]
    assert run["strategy"]["guidance"] == {"name": "cfg", "scale": 4.0, "rescale": 0.0, "start": 0.0, "stop": 1.0}
    assert run["strategy"]["sampler"] == {"name": "ddim", "eta": 0.0}
    assert run["nfe"] == 6 and run["steps"] == 3
    assert Image.open(out / "0000_seed5.png").size == (32, 32)


def test_generate_img2img_and_strategy_file(runner: CliRunner, tiny_models_file: Path, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(init)
    strategy = tmp_path / "s.json"
    strategy.write_text(json.dumps({"sampler": {"name": "dpmpp_2m"}, "guidance": {"name": "none"}}))
    out = tmp_path / "out"
    result = runner.invoke(main, [
        "--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a cross", "--seed", "1",
        "--steps", "4", "--strategy", str(strategy), "--init-image", str(init), "--strength", "0.5", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["mode"] == "img2img" and run["steps"] == 2 and run["nfe"] == 2


def test_generate_takes_the_diffusers_and_openai_spellings(runner: CliRunner, tiny_models_file: Path,
                                                          tmp_path: Path) -> None:
    """--size, --num-inference-steps and --num-images-per-prompt are --width/--height, --steps and -n."""
    common = ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a cross", "--seed", "2"]
    aliased = runner.invoke(main, [*common, "--size", "24x32", "--num-inference-steps", "2",
                                   "--num-images-per-prompt", "2", "--out", str(tmp_path / "a")])
    canonical = runner.invoke(main, [*common, "--width", "24", "--height", "32", "--steps", "2", "-n", "2",
                                     "--out", str(tmp_path / "c")])
    assert aliased.exit_code == 0 and canonical.exit_code == 0, aliased.output + canonical.output
    for name in ("0000_seed2.png", "0001_seed3.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
        assert Image.open(tmp_path / "a" / name).size == (24, 32)
    assert json.loads((tmp_path / "a" / "results.json").read_text())["runs"][0]["steps"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "30"], "width: must be a multiple of 8"),
        (["--steps", "0"], "steps: must be between 1 and 150"),
        (["--steps", "151"], "steps: must be between 1 and 150"),  # the server's default limit too
        (["--width", "1536", "--height", "8"], "width: must be a multiple of 8 between 8 and 1024"),
        (["--size", "33x32"], "size: width must be a multiple of 8 between 8 and 1024, got 33"),
        (["--size", "big"], "size: must look like '512x512' or 'auto', got 'big'"),
        (["--size", "32x32", "--width", "32"], "size: give either size or width/height, not both"),
        (["--num-inference-steps", "3"], "num_inference_steps: give either num_inference_steps or steps, not both"),
        (["--num-images-per-prompt", "0"], "num_images_per_prompt: must be at least 1, got 0"),
        (["--stpes", "3"], "No such option '--stpes'. (Did you mean one of: '--sampler', '--size', '--steps'?)"),
        (["-n", "0"], "n: must be at least 1, got 0"),
        (["--guidance-scale", "nan"], "guidance_scale: must be a number >= 0"),
        (["--guidance-scale", "-1"], "guidance_scale: must be a number >= 0"),
        (["--strength", "2"], "strength: Input should be less than or equal to 1"),
        (["--init-image", "/nonexistent.png"], "init_image: file '/nonexistent.png' does not exist"),
        (["--sampler", "dpm"], "strategy.sampler.name: unknown sampler 'dpm'"),
        (["--sampler", '{"name": "ddim", "etta": 1}'], "strategy.sampler.etta: unknown parameter"),
        (["--model", "nope"], "model: unknown model 'nope'"),
        (["--schedule", "karras"], "schedule 'karras' cannot be used with sampler 'ddim'"),
        (["--sampler", "lcm", "--steps", "60"], "steps: 60 steps do not fit sampler 'lcm'"),
        (["--strategy", "ddim"], "strategy: must be a JSON object"),
        (["--strategy", '{"sampler": ' + "[" * 100_000 + "]" * 100_000 + "}"],  # was a RecursionError traceback
         "strategy: nests arrays and objects 100001 levels deep; at most 32 allowed"),
        (["--sampler", '{"name": "ddim", "eta": ' + "1" * 5000 + "}"], "strategy.sampler: is not valid JSON: Exceeds"),
        (["--guidance", "rcfg", "--guidance-scale", "3"], "give either guidance_scale or strategy.guidance"),
        (["--batch-size", "65"], "Invalid value for '--batch-size'"),
        # undecodable bytes in argv arrive as lone surrogates (surrogateescape)
        (["-p", "a \udcff cross"], "prompt.1: contains an unpaired UTF-16 surrogate (U+DCFF) at character 2"),
        (["--negative-prompt", "\udcc3"], "negative_prompt: contains an unpaired UTF-16 surrogate (U+DCC3)"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    runner: CliRunner, tiny_models_file: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(main, ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a cross",
                                  "--steps", "2", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unreadable_init_image(runner: CliRunner, tiny_models_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    out = tmp_path / "out"
    result = runner.invoke(main, ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a",
                                  "--init-image", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "init_image: cannot be read as an image" in result.output
    assert not out.exists()


def test_strategies_lists_components_with_parameters(runner: CliRunner) -> None:
    result = runner.invoke(main, ["strategies"])
    assert result.exit_code == 0
    for fragment in ("sampler:", "  ddim — DDIM", "eta: float (default 0.0; minimum 0.0, maximum 1.0)",
                     "guidance:", "  cfg — CFG", "scale: float (default 7.5", "schedule:", "timesteps: "):
        assert fragment in result.output, fragment
    schemas = json.loads(runner.invoke(main, ["strategies", "--json"]).output)
    assert schemas["sampler:dpmpp_2m"]["properties"]["order"]["enum"] == [1, 2, 3]


def test_models_lists_registry(runner: CliRunner, tiny_models_file: Path) -> None:
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0 and "shapes  (builtin:" in result.output and "gmm  (builtin:" in result.output
    rows = json.loads(runner.invoke(main, ["--models", str(tiny_models_file), "models", "--json"]).output)
    assert rows[0]["id"] == "tiny" and rows[0]["available"] is True


def test_binary_prompts_file(runner: CliRunner, tiny_models_file: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe\x00binary")
    result = runner.invoke(main, ["--models", str(tiny_models_file), "generate", "--model", "tiny",
                                  "--prompts-file", str(prompts), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "prompts_file: is not UTF-8 text" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "ddim"], "strategy: must be a JSON object"),
        (["--repeats", "0"], "Invalid value for '--repeats'"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--guidance-scale", "nan"], "guidance_scale: must be a number >= 0"),
    ],
)
def test_eval_bad_options(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(main, ["eval", *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("sampler", [
    {"name": "deis", "variant": "tab", "order": 4, "lower_order_final": True, "final_sigmas_type": "zero"},
    {"name": "hb", "beta": 0.8, "base": "plms", "plms_order": 4, "lower_order_final": True,
     "final_sigmas_type": "zero"},
    {"name": "ghvb", "order": 3.8, "final_sigmas_type": "sigma_min"},
])
def test_generate_with_our_samplers(runner: CliRunner, tiny_models_file: Path, tmp_path: Path, sampler: dict) -> None:
    out = tmp_path / "out"
    result = runner.invoke(main, [
        "--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a red circle on a blue background",
        "--steps", "5", "--out", str(out), "--sampler", json.dumps(sampler),
        "--schedule", '{"name": "spacing", "spacing": "log_snr"}',
    ])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["strategy"]["sampler"] == sampler and run["nfe"] == 10
    assert run["strategy"]["schedule"] == {"name": "spacing", "spacing": "log_snr"}


# third-party notices that do not concern a user (accel_diffusion/third_party_output.py): none may reach the console
THIRD_PARTY_NOISE = ("accelerate", "torchvision", "Loading pipeline components", "Loading weights", "```")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "accel_diffusion.cli", *args]


def test_generate_says_what_it_loads_and_prints_no_third_party_notices(tiny_models_file: Path,
                                                                         tmp_path: Path) -> None:
    done = subprocess.run(_cli("--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a cross",
                               "--seed", "1", "--steps", "2", "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("wrote 1 image(s) to ")
    lines = done.stderr.splitlines()
    assert lines[0] == "loading tiny…" and re.fullmatch(r"loaded tiny in \d+\.\d s \(cpu, float32\)", lines[1])
    assert [word for word in THIRD_PARTY_NOISE if word in done.stderr] == []


def test_serve_reports_loading_warm_up_and_ready_and_prints_no_third_party_notices(tiny_models_file: Path) -> None:
    with socket.socket() as probe:  # a free port (the settings refuse port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(_cli("--models", str(tiny_models_file), "serve", "--model", "tiny", "--port", str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "ACCEL_DIFFUSION_ENGINE_ACCELERATION": "none"})
    lines: list[str] = []
    try:
        assert server.stdout is not None
        for line in server.stdout:  # start-up ends with uvicorn's "Uvicorn running on ..."
            lines.append(line.rstrip("\n"))
            if "Uvicorn running on" in line or len(lines) > 100:
                break
    finally:
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=120)
    output = "\n".join(lines)
    ours = [line.removeprefix("INFO:").strip() for line in lines if "tiny" in line]
    assert ours[:3] == ["loading tiny…", ours[1], "warming up tiny (2 steps)…"], output
    assert re.fullmatch(r"loaded tiny in \d+\.\d s \(cpu, float32\)", ours[1]), output
    assert re.fullmatch(r"ready in \d+\.\d s: serving tiny", ours[3]), output
    assert [word for word in THIRD_PARTY_NOISE if word in output + rest] == []
    assert server.returncode == 0


def test_generate_with_the_compiled_engine(runner: CliRunner, tiny_models_file: Path, tmp_path: Path) -> None:
    """--engine-acceleration compile builds the run's graphs first (UNet rows 1 and 2, decode 1 row), then
    generates the eager run's images (within a pixel level: the graphs round differently)."""
    common = ["--models", str(tiny_models_file), "generate", "--model", "tiny", "-p", "a cross", "--seed", "3",
              "--steps", "3", "--batch-size", "1"]
    eager, fast = tmp_path / "eager", tmp_path / "compiled"
    assert runner.invoke(main, [*common, "--out", str(eager)]).exit_code == 0
    result = runner.invoke(main, [*common, "--out", str(fast), "--engine-acceleration", "compile"])
    assert result.exit_code == 0, result.output
    assert "compiling tiny: UNet rows [1, 2], decode rows [1]" in result.output
    assert "compiled 3 graphs in" in result.output
    summary = json.loads((fast / "results.json").read_text())
    assert summary["runs"][0]["acceleration"] == "compile"
    a, b = (np.asarray(Image.open(d / "0000_seed3.png")).astype(int) for d in (eager, fast))
    assert np.abs(a - b).max() <= 1
