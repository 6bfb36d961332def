"""Batch runs on the tiny model: outputs, resume, exactly-once after kill -9, shards, bad lines, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from accel_diffusion.batch import LocalBackend, run_batch
from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.strategy import GenerationRequest

PROMPTS = ["a red circle on a blue background", "a white cross on a green background",
           "a yellow triangle on a black background", "a purple square on an orange background"]


def write_manifest(path: Path, count: int, steps: int = 3, bad_lines: bool = False) -> Path:
    lines = [json.dumps({"prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": steps, "n": 1 + i % 2, "id": f"r{i}"})
             for i in range(count)]
    if bad_lines:
        lines[1:1] = ['{"prompt": "x", "steps": 0}']
        lines[4:4] = ["this is not json", '{"prompt": "x", "colour": "red"}']
    path.write_text("\n".join(lines) + "\n")
    return path


def tree(root: Path) -> dict[str, object]:
    """Every image (its bytes) and per-request record (less its timings) of an output folder."""
    files: dict[str, object] = {}
    for path in sorted((root / "images").iterdir()):
        files[f"images/{path.name}"] = path.read_bytes()
    for path in sorted((root / "results").iterdir()):
        record = json.loads(path.read_text())
        record.pop("timings")
        files[f"results/{path.name}"] = record
    return files


@pytest.fixture(scope="module")
def backend(tiny_models_file: Path) -> LocalBackend:
    return LocalBackend(tiny_models_file)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, backend: LocalBackend) -> tuple[Path, Path]:
    """An uninterrupted, unsharded run of a 12-line manifest."""
    root = tmp_path_factory.mktemp("reference")
    manifest = write_manifest(root / "manifest.jsonl", 12, steps=6)
    report = run_batch(manifest, root / "out", backend, progress=False)
    assert report.ok and report.generated == 12 and report.images == 18
    return manifest, root / "out"


def test_outputs_are_the_engines_images_with_a_record_per_request(reference: tuple[Path, Path],
                                                                  tiny_models_file: Path) -> None:
    _, out = reference
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 13))
    assert [r["id"] for r in records] == [f"r{i}" for i in range(12)]
    first = records[1]  # n = 2, seed 101
    assert first["seeds"] == [101, 102] and first["nfe"] == 6 * 2 and first["mode"] == "local"
    assert set(first["timings"]) >= {"denoise", "decode", "total", "wall"}
    assert first["strategy"]["sampler"]["name"] == "ddim"
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    expected = engine.generate(GenerationRequest.create(model="tiny", prompt=PROMPTS[1], n=2, seed=101, steps=6),
                               batch_invariant=True).to_uint8()
    written = np.stack([np.asarray(Image.open(out / name)) for name in first["files"]])
    assert np.array_equal(written, expected)
    assert len(list((out / "images").iterdir())) == 18 and not list((out / ".tmp").iterdir())


def test_images_carry_the_line_id_and_an_edited_id_is_generated_again(tmp_path: Path,
                                                                     backend: LocalBackend) -> None:
    manifest, out = tmp_path / "manifest.jsonl", tmp_path / "out"

    def run(lines: list[dict]) -> tuple[object, dict[str, dict]]:
        manifest.write_text("".join(json.dumps({"seed": 7, "steps": 2, **line}) + "\n" for line in lines))
        report = run_batch(manifest, out, backend, progress=False)
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        return report, {r["id"] or r["key"]: r for r in records}

    lines = [{"prompt": PROMPTS[0], "id": "cat", "n": 2}, {"prompt": PROMPTS[1]},
             {"prompt": PROMPTS[2], "id": "dup"}, {"prompt": PROMPTS[3], "id": "dup"}]
    report, records = run(lines)
    assert report.ok and report.generated == 4 and report.images == 5
    assert records["cat"]["files"] == ["images/cat-0.png", "images/cat-1.png"]
    unnamed = next(r for r in records.values() if r["id"] is None)
    assert unnamed["files"] == [f"images/{unnamed['key']}-0.png"]
    dups = [r for r in (json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()) if r["id"] == "dup"]
    assert sorted(r["files"][0] for r in dups) == sorted(f"images/{r['key']}-0.png" for r in dups)  # collide: keys
    first_cat = (out / "images" / "cat-0.png").read_bytes()
    before = tree(out)

    report, _ = run(lines)  # a rerun skips everything
    assert report.generated == 0 and report.already_done == 4 and tree(out) == before

    report, records = run([{**lines[0], "prompt": PROMPTS[3]}, *lines[1:]])  # the id now names another request
    assert report.generated == 1 and report.already_done == 3
    assert (out / "images" / "cat-0.png").read_bytes() != first_cat

    report, _ = run(lines)  # back to the first request: its images were replaced, so it runs again
    assert report.generated == 1 and report.already_done == 3
    assert (out / "images" / "cat-0.png").read_bytes() == first_cat and tree(out) == {
        **before, **{k: v for k, v in tree(out).items() if k not in before}}


def test_a_rerun_skips_everything_and_changes_nothing(reference: tuple[Path, Path], backend: LocalBackend) -> None:
    manifest, out = reference
    before = tree(out)
    report = run_batch(manifest, out, backend, progress=False)
    assert report.ok and report.generated == 0 and report.already_done == 12
    assert tree(out) == before


def test_kill_9_in_the_middle_then_rerun_gives_exactly_the_uninterrupted_outputs(
        tmp_path: Path, tiny_models_file: Path) -> None:
    manifest = write_manifest(tmp_path / "manifest.jsonl", 30, steps=6)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accel_diffusion.cli", "--models", str(tiny_models_file), "batch", str(manifest),
               "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "results").is_dir() and len(list((out / "results").iterdir())) >= 4:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = len(list((out / "results").iterdir()))
    assert 4 <= partial < 30
    assert not (out / "results.jsonl").exists()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{30 - partial} generated, {partial} already done" in rerun.stderr
    # the uninterrupted run, also in a fresh process (same torch thread count, so the same kernels)
    uninterrupted = [*command[:-3], "--out", str(tmp_path / "uninterrupted"), "--quiet"]
    assert subprocess.run(uninterrupted, env=env, capture_output=True, timeout=300).returncode == 0
    assert tree(out) == tree(tmp_path / "uninterrupted")  # no duplicate, missing or partial file, byte for byte
    assert not list((out / ".tmp").iterdir())
    assert len((out / "results.jsonl").read_text().splitlines()) == 30


def test_shards_are_disjoint_and_their_union_is_the_unsharded_run(
        tmp_path: Path, reference: tuple[Path, Path], backend: LocalBackend) -> None:
    manifest, expected = reference
    keys = []
    for index in range(3):
        report = run_batch(manifest, tmp_path / "shared", backend, shard_index=index, num_shards=3, progress=False)
        assert report.ok
        lines = (tmp_path / "shared" / f"results.shard-{index}-of-3.jsonl").read_text().splitlines()
        keys.append({json.loads(line)["key"] for line in lines})
        alone = run_batch(manifest, tmp_path / f"own-{index}", backend, shard_index=index, num_shards=3,
                          progress=False)
        assert alone.already_done == 0 and alone.generated == len(keys[-1])
    assert sum(len(k) for k in keys) == 12 and len(set.union(*keys)) == 12  # disjoint, complete
    assert tree(tmp_path / "shared") == tree(expected)
    union: dict[str, object] = {}
    for index in range(3):
        union |= tree(tmp_path / f"own-{index}")
    assert union == tree(expected)


def test_bad_lines_go_to_the_errors_file_and_the_rest_runs(tmp_path: Path, tiny_models_file: Path) -> None:
    manifest = write_manifest(tmp_path / "manifest.jsonl", 4, bad_lines=True)
    command = [sys.executable, "-m", "accel_diffusion.cli", "--models", str(tiny_models_file), "batch", str(manifest),
               "--out", str(tmp_path / "out"), "--quiet"]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["field"]) for e in errors] == [(2, "steps"), (5, "line"), (6, "colour")]
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 3, 4, 7]
    assert "line 6: colour: unknown field" in done.stderr


def test_a_request_failing_at_run_time_is_reported_and_the_others_finish(tmp_path: Path,
                                                                        backend: LocalBackend) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"prompt": "a", "seed": 1, "steps": 2}) + "\n"
                        + json.dumps({"prompt": "b", "seed": 2, "steps": 2, "model": "missing"}) + "\n")
    report = run_batch(manifest, tmp_path / "out", backend, progress=False)
    assert not report.ok and report.generated == 1 and report.failed == 1
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert error["line"] == 2 and error["kind"] == "failed" and error["type"] == "model_not_found"


def test_a_request_whose_outputs_cannot_be_written_is_a_failure_not_a_silent_gap(
        tmp_path: Path, backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    from accel_diffusion.batch.outputs import BatchOutputs

    original = BatchOutputs.write_request

    def disk_full_on_b(self: BatchOutputs, key: str, images: list[bytes], output_format: str,
                       record: dict, name: str | None = None) -> list[str]:
        if record["request"]["prompt"] == "b":
            raise OSError(28, "No space left on device")
        return original(self, key, images, output_format, record, name)

    monkeypatch.setattr(BatchOutputs, "write_request", disk_full_on_b)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"prompt": p, "seed": 1, "steps": 2}) + "\n" for p in "ab"))
    report = run_batch(manifest, tmp_path / "out", backend, progress=False)
    assert not report.ok and report.generated == 1 and report.failed == 1
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert error["line"] == 2 and error["type"] == "OSError" and "No space left" in error["message"]


def test_through_a_server_the_outputs_are_byte_identical_to_the_local_run(
        tmp_path: Path, reference: tuple[Path, Path], tiny_models_file: Path) -> None:
    from accel_diffusion.server import create_app
    from server_clients import make_settings, running_server

    from accel_diffusion.batch import ServerBackend

    manifest, expected = reference
    with running_server(create_app(make_settings(tiny_models_file, queue_max=2))) as (_, _, url):
        backend = ServerBackend(url, concurrency=4)
        try:
            report = run_batch(manifest, tmp_path / "out", backend, progress=False)
        finally:
            backend.close()
    assert report.ok and report.generated == 12 and report.images == 18  # queue of 2: 429s were retried
    got, want = tree(tmp_path / "out"), tree(expected)
    assert {k: v for k, v in got.items() if k.startswith("images/")} == {
        k: v for k, v in want.items() if k.startswith("images/")}
    for name, record in got.items():
        if name.startswith("results/"):
            assert record["mode"] == "server" and record["job_id"]
            assert {k: record[k] for k in ("key", "seeds", "nfe", "files", "request")} == {
                k: want[name][k] for k in ("key", "seeds", "nfe", "files", "request")}


def test_the_shard_comes_from_the_kubernetes_indexed_job_environment(tmp_path: Path, tiny_models_file: Path) -> None:
    from accel_diffusion.batch.manifest import in_shard, read_manifest

    manifest = write_manifest(tmp_path / "manifest.jsonl", 8, steps=2)
    command = [sys.executable, "-m", "accel_diffusion.cli", "--models", str(tiny_models_file), "batch", str(manifest),
               "--out", str(tmp_path / "out"), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JOB_COMPLETION_INDEX": "1", "ACCEL_DIFFUSION_NUM_SHARDS": "2"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(shard 1 of 2)" in done.stderr
    written = [json.loads(line)["key"] for line in
               (tmp_path / "out" / "results.shard-1-of-2.jsonl").read_text().splitlines()]
    planned, _ = read_manifest(manifest, "tiny")
    assert written == [p.key for p in planned if in_shard(p, 1, 2)] and 0 < len(written) < 8
