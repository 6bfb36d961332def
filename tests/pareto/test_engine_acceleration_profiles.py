"""Profiles keyed by the engine acceleration they were measured with: ``<model>@<device>+compile.json`` next to
the eager one, picked by a compiling engine (falling back to the eager profile, upper bounds, said in the echo),
never by an eager one; ``bench pareto --engine-acceleration compile``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pareto_fixtures import TINY_POINTS, make_profile, write_profile
from server_clients import make_settings

from accel_diffusion.cli import main
from accel_diffusion.engine import Engine
from accel_diffusion.errors import InvalidRequestError
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto import profile as profile_module
from accel_diffusion.pareto.auto import front_summary
from accel_diffusion.pareto.front import Margins
from accel_diffusion.pareto.profile import (
    BUILTIN_PROFILES_DIR,
    PROFILE_FORMAT,
    ParetoProfile,
    ProfileError,
    device_key,
    find_profile,
    use_profiles_dir,
)
from accel_diffusion.pareto.sweep import (
    ShapesMeter,
    anchor_candidates,
    candidates_for,
    default_families,
    near_front,
    new_profile,
    reusable_quality,
    sweep,
)
from accel_diffusion.strategy import GenerationRequest

PROMPT = "a red circle on a blue background"
EAGER = TINY_POINTS  # measured without engine acceleration
COMPILED = [(s, steps, q, ms * 0.5, b * 0.8) for s, steps, q, ms, b in EAGER]  # the same points, faster


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    use_profiles_dir(None)
    monkeypatch.setenv(profile_module.PROFILES_DIR_ENV, str(tmp_path))
    return tmp_path


def compiled_profile(model: str = "tiny", points: list[tuple] = COMPILED) -> ParetoProfile:
    profile = make_profile(model, device_key("cpu"), points)
    profile.engine_acceleration = "compile"
    profile.compile_buckets = [1, 2, 4, 8]
    return profile


def auto(budget: float, **fields) -> GenerationRequest:
    return GenerationRequest.create(model="tiny", prompt=PROMPT, strategy="auto", latency_budget_ms=budget, **fields)


def test_a_profile_round_trips_its_engine_acceleration_under_its_own_name(folder: Path) -> None:
    profile = compiled_profile()
    path = write_profile(folder, profile)
    assert path.name == f"tiny@{device_key('cpu')}+compile.json"
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT == "accel-diffusion/pareto-profile@2"
    assert data["engine_acceleration"] == "compile" and data["compile_buckets"] == [1, 2, 4, 8]
    again = ParetoProfile.load(path)
    assert again == profile and again.file_name == path.name
    eager = make_profile("tiny", device_key("cpu"), EAGER)
    assert eager.engine_acceleration == "none" and eager.file_name == f"tiny@{device_key('cpu')}.json"


def test_an_old_profile_without_the_field_reads_as_eager(tmp_path: Path) -> None:
    data = make_profile("tiny", "cpu-x-2t", EAGER).model_dump()
    for key in ("engine_acceleration", "compile_buckets", "quality_reused_from"):
        del data[key]
    for point in data["points"]:
        del point["quality_reused"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**data, "format": "accel-diffusion/pareto-profile@1"}))
    old = ParetoProfile.load(path)
    assert old.engine_acceleration == "none" and old.format == PROFILE_FORMAT and len(old.points) == 3
    path.write_text(json.dumps({**data, "format": "accel-diffusion/pareto-profile@1", "engine_acceleration": "none"}))
    with pytest.raises(ProfileError, match="has no engine_acceleration"):
        ParetoProfile.load(path)
    shipped = ParetoProfile.load(BUILTIN_PROFILES_DIR / "shapes@cpu-x86-64-2t.json")  # written as @1, measured eager
    assert shipped.engine_acceleration == "none" and shipped.compile_buckets is None


def test_a_compiling_engine_picks_the_compiled_profile_and_else_falls_back_to_eager_saying_so(
        folder: Path, tiny_models_file: Path) -> None:
    write_profile(folder, make_profile("tiny", device_key("cpu"), EAGER))
    registry = ModelRegistry.from_file(tiny_models_file)
    eager_engine, compiling = Engine(registry), Engine(registry, acceleration="compile")

    # only the eager profile: a compiling engine uses it, its latencies upper bounds, and says so
    fallback = compiling.resolve_auto(auto(45)).strategy.auto
    assert fallback["profile"] == f"tiny@{device_key('cpu')}.json" and fallback["expected_latency_ms"] == 30.0
    assert fallback["engine_acceleration"] == "compile" and fallback["profile_engine_acceleration"] == "none"
    assert "upper bounds" in fallback["latency_note"]
    with pytest.raises(InvalidRequestError) as refused:  # under the fastest eager latency
        compiling.resolve_auto(auto(9))
    assert refused.value.field == "latency_budget_ms" and "fastest takes 10.0 ms" in refused.value.message

    write_profile(folder, compiled_profile())
    chosen = compiling.resolve_auto(auto(31))  # fits the compiled 3-step point (30 ms), not its eager 60 ms
    record = chosen.strategy.auto
    assert chosen.steps == 3 and record["expected_latency_ms"] == 30.0 and record["expected_quality"] == 0.9
    assert record["profile"] == f"tiny@{device_key('cpu')}+compile.json"
    assert record["profile_engine_acceleration"] == record["engine_acceleration"] == "compile"
    assert "latency_note" not in record
    plain = eager_engine.resolve_auto(auto(31)).strategy.auto  # an eager engine never uses the compiled profile
    assert plain["profile_engine_acceleration"] == "none" and plain["expected_latency_ms"] == 30.0
    assert plain["expected_quality"] == 0.6

    summary = front_summary("tiny", "cpu", acceleration="compile")
    assert summary is not None and summary["profile_engine_acceleration"] == "compile"
    assert [p["latency_ms"] for p in summary["points"]] == [5.0, 15.0, 30.0]
    eager_summary = front_summary("tiny", "cpu", acceleration="none")
    assert eager_summary is not None and eager_summary["profile_engine_acceleration"] == "none"


def test_the_server_resolves_with_its_engine_acceleration(folder: Path, tiny_models_file: Path) -> None:
    from accel_diffusion.server.app import ServerState

    write_profile(folder, make_profile("tiny", device_key("cpu"), EAGER))
    registry = ModelRegistry.from_file(tiny_models_file)
    state = ServerState(make_settings(tiny_models_file, engine_acceleration="compile"), registry)
    record = state.resolve_auto(auto(45)).strategy.auto
    assert record["engine_acceleration"] == "compile" and record["profile_engine_acceleration"] == "none"
    write_profile(folder, compiled_profile())
    assert state.resolve_auto(auto(31)).steps == 3
    eager_state = ServerState(make_settings(tiny_models_file), registry)
    assert eager_state.resolve_auto(auto(31)).steps == 2


def test_the_error_paths(folder: Path, tiny_models_file: Path) -> None:
    engine = Engine(ModelRegistry.from_file(tiny_models_file))
    write_profile(folder, compiled_profile())
    with pytest.raises(InvalidRequestError) as only_compiled:  # an eager engine with only a compiled profile
        engine.resolve_auto(auto(100))
    assert only_compiled.value.field == "strategy"
    message = only_compiled.value.message
    assert "+compile.json" in message and "serve with engine_acceleration compile" in message
    assert front_summary("tiny", "cpu") is None

    misnamed = folder / f"tiny@{device_key('cpu')}.json"  # a compiled profile under the eager name
    misnamed.write_text((folder / compiled_profile().file_name).read_text())
    with pytest.raises(InvalidRequestError, match="rename it") as wrong:
        engine.resolve_auto(auto(100))
    assert wrong.value.field == "strategy"
    with pytest.raises(ValueError, match="acceleration must be one of"):
        find_profile("tiny", device_key("cpu"), "tensorrt")


def test_quality_is_reused_only_from_the_same_eager_measurement() -> None:
    donor = make_profile("tiny", "cpu-x-2t", EAGER)
    fresh = make_profile("tiny", "cpu-x-2t", [])
    fresh.engine_acceleration = "compile"
    points, record = reusable_quality(donor, fresh, exclude=["tiny_student"])
    assert set(points) == {p.key() for p in donor.points} and record["profile"] == donor.file_name
    with pytest.raises(ValueError, match="seed"):
        reusable_quality(donor, fresh.model_copy(update={"seed": 1}))
    with pytest.raises(ValueError, match=r"versions\.torch"):
        reusable_quality(donor.model_copy(update={"versions": {"torch": "0.1"}}), fresh)
    with pytest.raises(ValueError, match="give the eager profile"):
        reusable_quality(compiled_profile(), fresh)
    # near the front: the front itself and what a front point as good beats by less than the fraction
    slower = [(EAGER[1][0], 4, 0.6, 40.0, 6.0), (EAGER[1][0], 8, 0.6, 90.0, 9.0)]
    slow = make_profile("tiny", "cpu-x-2t", [*EAGER, *slower])
    near = near_front(slow, 0.3)
    assert len(near) == 4 and all(p.key() in near for p in slow.front_points())


def test_bench_pareto_compiled_reuses_eager_quality_and_times_only_built_graphs(
        tiny_models_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager donor (two 1-step families, swept in-process), then ``bench pareto --engine-acceleration compile``
    near its front: compiled latencies; the donor's qualities (its first point measured again and equal, the
    second copied); the anchors, not in the donor, measured; and no graph built while timed (the meter raises)."""
    registry = ModelRegistry.from_file(tiny_models_file)
    spec = registry.spec("tiny")
    anchors = [c for _, c in anchor_candidates("tiny", spec.default_strategy.model_dump(exclude_none=True),
                                               spec.default_steps)]
    meter = ShapesMeter(Engine(registry), "tiny", images=4, batch_size=1, repeats=1)
    donor_out = tmp_path / "tiny@eager.json"
    fresh = new_profile("tiny", "cpu", meter, width=32, height=32, seed=0, margins=Margins(0.05, 0.01), command="t")
    donor = sweep(fresh, candidates_for("tiny", default_families()[-2:], [1]), meter, donor_out, progress=False)
    assert len(donor.points) == 2 and donor.engine_acceleration == "none"

    compiled_out = tmp_path / "tiny@cpu+compile.json"
    monkeypatch.setattr(ModelRegistry, "from_file", classmethod(lambda cls, path=None: registry))  # see its graphs
    args = ["--models", str(tiny_models_file), "bench", "pareto", "--model", "tiny", "--steps", "1", "--images", "4",
            "--repeats", "1", "--batch-size", "1", "--no-searched", "--out", str(compiled_out)]
    result = CliRunner().invoke(main, [*args, "--engine-acceleration", "compile", "--compile-buckets", "2",
                                       "--quality-from", str(donor_out), "--near-front", "0.9"])
    assert result.exit_code == 0, result.output
    profile = ParetoProfile.load(compiled_out)
    assert profile.engine_acceleration == "compile" and profile.compile_buckets == [2] and profile.complete
    assert profile.quality_reused_from is not None and profile.quality_reused_from["profile"] == donor.file_name
    graphs = registry.get("tiny").compiled_model().summary()
    assert [v["graphs"] for v in graphs.values()] == [1, 1]  # the UNet and the decode at bucket 2 (1 and 2 rows)

    by_key = {p.key(): p for p in donor.points}
    near = near_front(donor, 0.9)  # both donor points: the CFG one's 2x latency is within 10x of the front's
    settled = {p.key() for p in profile.points} | {s["key"] for s in profile.skipped}
    assert len(settled) == 12 and {c.key() for c in anchors} <= {p.key() for p in profile.points}  # 9 x 1 + 3
    far = {s["key"] for s in profile.skipped if "far from the eager front" in s["reason"]}
    assert near == set(by_key) and far == settled - near - {c.key() for c in anchors}
    assert len(profile.points) == 5
    for point in profile.points:  # the same images: the donor's qualities, reused or (the first) measured again
        if point.key() in by_key:
            assert point.metrics == pytest.approx(by_key[point.key()].metrics, abs=1e-6)
            assert point.latency_ms != by_key[point.key()].latency_ms  # latency measured again, compiled
        assert point.quality_reused == (point.key() == donor.points[1].key())  # the first donor point re-measured

    wrong = CliRunner().invoke(main, [*args, "--near-front", "0.5"])
    assert wrong.exit_code == 2 and "near_front" in wrong.output and "--quality-from" in wrong.output
