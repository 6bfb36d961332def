"""The sweep: measuring order, pruning (dominated region, plateau), the budget, resume; the shapes meter."""

from __future__ import annotations

from pathlib import Path

import pytest

from accel_diffusion.engine import Engine
from accel_diffusion.models.registry import ModelRegistry
from accel_diffusion.pareto.front import Margins
from accel_diffusion.pareto.profile import ParetoProfile
from accel_diffusion.pareto.sweep import Candidate, Measured, ShapesMeter, candidates_for, open_profile, sweep

FAMILIES = [{"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"}, "guidance": {"name": "none"}},
            {"sampler": {"name": "euler"}, "schedule": {"name": "spacing"}, "guidance": {"name": "none"}}]


class CurveMeter:
    """Known curves (a test fitness, like the search's synthetic one): latency = steps x per-step cost;
    quality saturates with steps at a family's own rate. Counts what it measured."""

    quality_metric = "prompt_accuracy"
    quality_description = "synthetic"
    quality_ceiling = 1.0
    batch_size = 4
    prompts = ["p"] * 8

    def __init__(self, curves: dict[str, dict[int, float]], cost: dict[str, float]) -> None:
        self.curves, self.cost = curves, cost
        self.latency_calls: list[str] = []
        self.quality_calls: list[str] = []

    def _name(self, candidate: Candidate) -> str:
        return candidate.strategy["sampler"]["name"]

    def latency(self, candidate: Candidate) -> Measured:
        self.latency_calls.append(f"{self._name(candidate)}{candidate.steps}")
        ms = self.cost[self._name(candidate)] * candidate.steps
        return Measured(ms, ms / 2, candidate.steps)

    def quality(self, candidate: Candidate, measured: Measured) -> None:
        self.quality_calls.append(f"{self._name(candidate)}{candidate.steps}")
        measured.quality = self.curves[self._name(candidate)][candidate.steps]
        measured.metrics = {"prompt_accuracy": measured.quality}


def empty_profile() -> ParetoProfile:
    return ParetoProfile(model="m", device="test", quality_metric="prompt_accuracy", batch_size=4, samples=8,
                         margins={"latency": 0.05, "quality": 0.01})


def curve_meter() -> CurveMeter:
    return CurveMeter({"ddim": {1: 0.1, 2: 0.5, 4: 0.8, 8: 0.8, 16: 0.805, 32: 0.81},
                       "euler": {1: 0.2, 2: 0.6, 4: 1.0, 8: 1.0, 16: 1.0, 32: 1.0}},
                      {"ddim": 10.0, "euler": 12.0})


def test_candidates_go_round_robin_by_steps_searched_and_students_first() -> None:
    searched = [Candidate("m", {"sampler": {"name": "ddim"}}, 4)]
    order = candidates_for("m", FAMILIES, [4, 1, 2], [("m_student", [2, 1])], searched)
    assert [(c.model, c.steps, c.strategy.get("sampler", {}).get("name")) for c in order] == [
        ("m", 4, "ddim"), ("m_student", 1, None), ("m_student", 2, None),
        ("m", 1, "ddim"), ("m", 1, "euler"), ("m", 2, "ddim"), ("m", 2, "euler"), ("m", 4, "ddim"), ("m", 4, "euler")]


def test_pruning_skips_the_dominated_region(tmp_path: Path) -> None:
    meter = curve_meter()
    candidates = candidates_for("m", FAMILIES, [1, 2, 4, 8, 16, 32])
    profile = sweep(empty_profile(), candidates, meter, tmp_path / "p.json", progress=False)
    # euler reaches the ceiling at 4 steps (48 ms): every slower candidate is dominated, its quality not measured
    assert meter.quality_calls == ["ddim1", "euler1", "ddim2", "euler2", "ddim4", "euler4"]
    assert profile.complete and len(profile.points) == 6
    assert [s["reason"].split(":")[0] for s in profile.skipped] == ["dominated"] * 6  # ddim 8 (80 ms) ... euler 32
    assert [profile.points[i].steps for i in profile.front] == [1, 1, 2, 2, 4, 4]  # every point a trade-off
    assert ParetoProfile.load(tmp_path / "p.json") == profile


def test_anchors_are_measured_first_never_pruned_and_stay_out_of_the_plateau(tmp_path: Path) -> None:
    """The plot's reference settings (diffusers' defaults, the model's own) are measured even where the pruning
    would skip them, and measuring one early does not make its family look flat."""
    meter = CurveMeter({"ddim": {1: 0.1, 2: 0.5, 4: 0.8, 8: 0.805, 16: 0.81, 32: 0.95}}, {"ddim": 10.0})
    anchor = Candidate("m", candidates_for("m", FAMILIES[:1], [32])[0].strategy, 32, anchor=True)
    candidates = candidates_for("m", FAMILIES[:1], [1, 2, 4, 8, 16, 32], anchors=[anchor])
    assert candidates[0] is anchor and len(candidates) == 6  # ddim 32 once, as the anchor
    profile = sweep(empty_profile(), candidates, meter, tmp_path / "p.json", progress=False)
    # the anchor (0.95 at 32) first; then 1, 2, 4, 8, 16 as without it: the plateau still stops nothing measured
    assert meter.quality_calls == ["ddim32", "ddim1", "ddim2", "ddim4", "ddim8", "ddim16"]
    assert profile.complete and not profile.skipped
    euler = curve_meter()  # euler reaches the ceiling at 4 steps: a slow anchor is still measured
    slow = Candidate("m", candidates_for("m", FAMILIES[1:], [32])[0].strategy, 32, anchor=True)
    # placed last: the 8-step family candidate is dominated (the ceiling is reached at 4), the anchor is not
    sweep(empty_profile(), [*candidates_for("m", FAMILIES[1:], [1, 2, 4, 8]), slow], euler, tmp_path / "q.json",
          progress=False)
    assert euler.quality_calls == ["euler1", "euler2", "euler4", "euler32"]
    # a profile swept before the anchor existed pruned its configuration: resuming with the anchor measures it
    out = tmp_path / "r.json"
    before = sweep(empty_profile(), candidates_for("m", FAMILIES[1:], [1, 2, 4, 8, 32]), curve_meter(), out,
                   progress=False)
    assert slow.key() in {s["key"] for s in before.skipped}
    again = curve_meter()
    after = sweep(open_profile(out, empty_profile()), candidates_for("m", FAMILIES[1:], [1, 2, 4, 8, 32],
                                                                     anchors=[slow]), again, out, progress=False)
    assert again.quality_calls == ["euler32"] and after.complete
    assert slow.key() in {p.key() for p in after.points} and slow.key() not in {s["key"] for s in after.skipped}


def test_pruning_stops_a_family_whose_quality_plateaus(tmp_path: Path) -> None:
    meter = CurveMeter({"ddim": {1: 0.1, 2: 0.5, 4: 0.8, 8: 0.805, 16: 0.81, 32: 0.95, 64: 0.99}}, {"ddim": 10.0})
    profile = sweep(empty_profile(), candidates_for("m", FAMILIES[:1], [1, 2, 4, 8, 16, 32, 64]), meter,
                    tmp_path / "p.json", progress=False)
    # 0.8 -> 0.805 -> 0.81: two step counts within the 0.01 quality margin; 32 and 64 are not measured at all
    assert meter.quality_calls == ["ddim1", "ddim2", "ddim4", "ddim8", "ddim16"]
    assert meter.latency_calls == meter.quality_calls
    assert [s["reason"].split(":")[0] for s in profile.skipped] == ["plateau", "plateau"]


def test_a_family_is_the_configuration_key_without_the_steps() -> None:
    """What plateau detection groups by: the same for every step count, apart for other AR iterations; ``steps``
    left out of the key (and ``ar_iterations`` where unset), as the keys in profiles written before AR models."""
    ddim = {"sampler": {"name": "ddim"}}
    assert Candidate("m", ddim, 4).family == Candidate("m", ddim, 32).family == (
        '{"model": "m", "strategy": {"sampler": {"name": "ddim"}}}')
    assert Candidate("m", ddim, 4, ar_iterations=8).family == (
        '{"ar_iterations": 8, "model": "m", "strategy": {"sampler": {"name": "ddim"}}}')
    assert Candidate("m", ddim, 4, ar_iterations=16).family != Candidate("m", ddim, 4, ar_iterations=8).family
    assert Candidate("m", ddim, 4).key() == '{"model": "m", "steps": 4, "strategy": {"sampler": {"name": "ddim"}}}'


def test_a_budget_stops_early_and_a_rerun_resumes_to_the_same_profile(tmp_path: Path) -> None:
    candidates = candidates_for("m", FAMILIES, [1, 2, 4, 8])
    whole = sweep(empty_profile(), candidates, curve_meter(), tmp_path / "whole.json", progress=False)

    ticks = iter(range(1000))  # a clock that advances one second per reading
    first = curve_meter()
    out = tmp_path / "part.json"
    part = sweep(empty_profile(), candidates, first, out, budget_s=4.5, progress=False, clock=lambda: next(ticks))
    assert not part.complete and 0 < len(part.points) < len(whole.points)
    second = curve_meter()
    resumed = sweep(open_profile(out, empty_profile()), candidates, second, out, progress=False)
    assert resumed.complete
    assert not set(first.quality_calls) & set(second.quality_calls)  # nothing measured twice
    assert [p.key() for p in resumed.points] == [p.key() for p in whole.points]
    assert resumed.points == whole.points and resumed.front == whole.front


def test_resuming_another_sweep_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    empty_profile().save(out)
    other = empty_profile().model_copy(update={"seed": 1})
    with pytest.raises(ValueError, match="seed"):
        open_profile(out, other)


@pytest.mark.usefixtures("single_thread")
def test_shapes_meter_measures_through_the_engine(tmp_path: Path) -> None:
    meter = ShapesMeter(Engine(ModelRegistry.default()), "shapes", images=6, batch_size=2, repeats=1,
                        reference_steps=25, eval_batch=6)
    assert len(set(meter.prompts)) == 6
    reference = Candidate("shapes", {}, 25)  # the model's default strategy at the reference steps
    measured = meter.latency(reference)
    assert measured.nfe == 50 and measured.latency_ms > 0 and measured.batch_latency_ms > 0
    meter.quality(reference, measured)
    assert measured.metrics["paired_distance"] == 0.0  # the reference itself, same noise: the same images
    assert measured.quality == measured.metrics["prompt_accuracy"] >= 5 / 6
    one_step = Candidate("shapes", {"sampler": {"name": "ddim"}, "schedule": {"name": "spacing"},
                                    "guidance": {"name": "none"}}, 1)
    cheap = meter.latency(one_step)
    meter.quality(one_step, cheap)
    assert cheap.nfe == 1 and cheap.metrics["paired_distance"] > 0.05
    margins = Margins(latency=0.05, quality=0.01)
    profile = empty_profile().model_copy(update={"margins": {"latency": margins.latency, "quality": 0.01}})
    profile = sweep(profile, [reference, one_step], meter, tmp_path / "shapes.json", progress=False)
    assert len(profile.points) == 2


def test_a_forgotten_model_is_measured_again_on_resume(tmp_path: Path) -> None:
    """``bench pareto --remeasure NAME`` (a retrained student): its points and pruning records go, the rest stay."""
    meter = CurveMeter({"ddim": {1: 0.1, 2: 0.5, 4: 0.8}, "student": {1: 0.4}}, {"ddim": 10.0, "student": 5.0})
    student = Candidate("m_student", {"sampler": {"name": "student"}}, 1)
    candidates = [student, *candidates_for("m", FAMILIES[:1], [1, 2, 4])]
    out = tmp_path / "p.json"
    first = sweep(empty_profile(), candidates, meter, out, progress=False)
    assert first.complete and len(first.points) == 4
    profile = open_profile(out, empty_profile())
    profile.forget("m_student")
    assert not profile.complete and [p.model for p in profile.points] == ["m"] * 3
    assert profile.front == profile.compute_front()
    meter.curves["student"][1] = 0.6  # retrained
    again = CurveMeter(meter.curves, meter.cost)
    resumed = sweep(profile, candidates, again, out, progress=False)
    assert again.quality_calls == ["student1"] and resumed.complete
    assert [p.quality for p in resumed.points if p.model == "m_student"] == [0.6]
