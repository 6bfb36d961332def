"""Profiles of an autoregressive model (``shapes_mar``): its points carry the AR iterations, a DiSA point's steps
are the annealer's upper (the request sends none), ``bench pareto`` sweeps AR iterations x head steps, and
``"strategy": "auto"`` runs the chosen point, echoing its AR iterations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto import profile as profile_module
from accel_diffusion.pareto.auto import choose_point, front_summary
from accel_diffusion.pareto.profile import ParetoPoint, ParetoProfile, use_profiles_dir
from accel_diffusion.pareto.sweep import anchor_candidates, mar_candidates
from accel_diffusion.schedules.disa import StepAnnealer
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_profiles_dir(None)
    monkeypatch.setenv(profile_module.PROFILES_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(profile_module, "BUILTIN_PROFILES_DIR", tmp_path / "none")
    return tmp_path


def mar_default() -> dict:
    return ModelRegistry.default().spec("shapes_mar").default_strategy.model_dump(exclude_none=True)


def test_mar_candidates_cover_ar_iterations_by_constant_and_annealed_heads() -> None:
    candidates = mar_candidates("shapes_mar", mar_default(), ar_iterations=(2, 8), constant_steps=(5, 50),
                                disa_uppers=(20, 50))
    assert len({c.key() for c in candidates}) == len(candidates) == 2 * 2 + 2 * 2  # constant 5, 50; DiSA 20, 50
    assert [(c.steps, c.ar_iterations, c.strategy["schedule"]["name"]) for c in candidates[:2]] == [
        (5, 2, "spacing"), (5, 8, "spacing")]  # the cheap end first
    for c in candidates:
        assert c.strategy["sampler"] == mar_default()["sampler"]  # the head's sampler and guidance: the model's
        assert c.strategy["guidance"] == mar_default()["guidance"]
        request = c.request(PROMPT, 0)
        assert request.ar_iterations == c.ar_iterations
        if c.strategy["schedule"]["name"] == "disa":
            assert c.strategy["schedule"] == {"name": "disa", "upper": c.steps, "lower": 5, "kind": "linear"}
            assert request.steps is None  # DiSA decides the head's steps; a request with steps is refused
        else:
            assert request.steps == c.steps


def test_an_ar_model_has_its_own_default_as_its_only_anchor() -> None:
    anchors = anchor_candidates("shapes_mar", mar_default(), 50, 16)
    assert [(c.steps, c.ar_iterations, c.anchor) for _, c in anchors] == [(50, 16, True)]
    assert "16 AR iterations" in anchors[0][0]
    assert len(anchor_candidates("shapes", {"sampler": {"name": "ddim"}}, 25)) == 3  # diffusers' two and its own


def test_points_without_ar_iterations_keep_their_keys_and_with_them_round_trip(tmp_path: Path) -> None:
    plain = ParetoPoint(model="shapes", strategy={"sampler": {"name": "ddim"}}, steps=4, quality=0.5, latency_ms=10.0,
                        nfe=4)
    assert plain.key() == json.dumps({"model": "shapes", "strategy": {"sampler": {"name": "ddim"}}, "steps": 4},
                                     sort_keys=True)  # what profiles written before AR models hold
    ar = plain.model_copy(update={"model": "shapes_mar", "ar_iterations": 4})
    assert ar.key() != plain.model_copy(update={"model": "shapes_mar"}).key()
    profile = ParetoProfile(model="shapes_mar", device="d", quality_metric="prompt_accuracy", points=[plain, ar])
    again = ParetoProfile.load(profile.save(tmp_path / "p.json"))
    assert [p.ar_iterations for p in again.points] == [None, 4] and again.points[1].key() == ar.key()


def test_auto_leaves_ar_iterations_to_the_profile() -> None:
    with pytest.raises(InvalidRequestError, match="chooses the AR iterations") as err:
        GenerationRequest.create(model="shapes_mar", prompt=PROMPT, strategy="auto", latency_budget_ms=100,
                                 ar_iterations=4)
    assert err.value.field == "ar_iterations"


def test_bench_pareto_sweeps_the_ar_model_and_auto_runs_the_chosen_point(folder: Path) -> None:
    out = folder / "sweep.json"
    args = ["bench", "pareto", "--model", "shapes_mar", "--images", "2", "--repeats", "1", "--batch-size", "1",
            "--steps", "5", "--ar-iterations", "2", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    profile = ParetoProfile.load(out)
    assert profile.complete and profile.engine_acceleration == "none"
    def label(key: str) -> tuple:
        fields = json.loads(key)
        return fields["strategy"]["schedule"]["name"], fields["steps"], fields["ar_iterations"]

    settled = [label(p.key()) for p in profile.points] + [label(s["key"]) for s in profile.skipped]
    # the anchor (the model's default: constant 50 at its default AR iterations), constant 5 and DiSA 20/50 -> 5
    # at 2; measured, or pruned as dominated (2 images: a fast point at accuracy 1.0 prunes every slower one)
    default_k = int(ModelRegistry.default().get("shapes_mar").pipeline.config["default_ar_iterations"])
    assert sorted(settled) == sorted([("spacing", 50, default_k), ("spacing", 5, 2), ("disa", 20, 2),
                                      ("disa", 50, 2)])
    assert all(s["reason"].startswith("dominated") for s in profile.skipped)
    for point in profile.points:  # NFE = head evaluations (2 CFG branches) + transformer passes (2 per iteration)
        schedule = point.strategy["schedule"]
        plan = (StepAnnealer(schedule["upper"], schedule["lower"], schedule["kind"]).plan(point.ar_iterations)
                if schedule["name"] == "disa" else [point.steps] * point.ar_iterations)
        assert point.nfe == 2 * sum(plan) + 2 * point.ar_iterations
    anchor = next(p for p in profile.points if label(p.key()) == ("spacing", 50, default_k))
    assert anchor.metrics["paired_distance"] == 0.0  # the reference itself

    profile.save(folder / profile.file_name)  # served from the configured folder under its own name
    engine = Engine(ModelRegistry.default())
    fastest = min(profile.front_points(), key=lambda p: p.latency_ms)
    budget = fastest.latency_ms * 1.01
    chosen = profile.points[choose_point(profile, budget)]
    auto = engine.generate(GenerationRequest.create(model="shapes_mar", prompt=PROMPT, seed=3, strategy="auto",
                                                    latency_budget_ms=budget))
    echo = auto.summary()["strategy"]["auto"]
    assert echo["ar_iterations"] == chosen.ar_iterations and echo["expected_latency_ms"] == chosen.latency_ms
    explicit = engine.generate(GenerationRequest.create(model="shapes_mar", prompt=PROMPT, seed=3,
                                                        strategy=chosen.strategy, **chosen.request_fields()))
    def work(result) -> dict:  # what ran, not how long it took
        return {k: v for k, v in result.extra["ar"].items() if not k.endswith("_seconds")}

    assert np.array_equal(auto.images, explicit.images) and work(auto) == work(explicit)
    assert work(auto)["ar_iterations"] == chosen.ar_iterations and auto.nfe == chosen.nfe
    summary = front_summary("shapes_mar", "cpu")
    assert summary is not None and all("ar_iterations" in p for p in summary["points"])
    compiling = front_summary("shapes_mar", "cpu", acceleration="compile")  # the AR loop runs eagerly there too
    assert compiling is not None and compiling["profile_engine_acceleration"] == "none"
    assert "runs eagerly on every engine" in compiling["latency_note"]


def test_bench_pareto_refuses_what_an_ar_sweep_cannot_do(tmp_path: Path) -> None:
    base = ["bench", "pareto", "--out", str(tmp_path / "p.json")]
    compiled = CliRunner().invoke(main, [*base, "--model", "shapes_mar", "--engine-acceleration", "compile"])
    assert compiled.exit_code == 2 and "engine_acceleration" in compiled.output and "eagerly" in compiled.output
    student = CliRunner().invoke(main, [*base, "--model", "shapes_mar", "--student", "shapes_slimflow"])
    assert student.exit_code == 2 and "student" in student.output
    not_ar = CliRunner().invoke(main, [*base, "--model", "shapes", "--ar-iterations", "2"])
    assert not_ar.exit_code == 2 and "not autoregressive" in not_ar.output
    assert not (tmp_path / "p.json").exists()
