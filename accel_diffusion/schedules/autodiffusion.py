"""AutoDiffusion stage 1: an evolutionary search over K-step timestep sequences (Li et al., ICCV 2023).

Spec: ``specs/samplers.md`` §4. A candidate is K distinct training timesteps, kept strictly decreasing
(the order the engine visits them, as the ``timesteps`` schedule takes them). The fitness is any
callable ``candidate -> float``, *lower is better* (a distance, or 1 - prompt accuracy); the search
never calls the model itself.

Generation 0 is the uniform sequence (candidate 0), the caller's seeded sequences (known good ones, e.g. an
earlier search's best), the caller's hand-made grids, then mutations of the uniform sequence (and, taking turns
with it, of each seeded sequence: at least one each) and random candidates. Every epoch keeps the ``select``
best of everything evaluated so far (elitism), breeds ``mutations`` mutants and ``crossovers`` children of those
parents, and refills the generation with random candidates up to ``population``. A visited cache
means no candidate is evaluated twice.

Three bugs of the reference code are absent here (tested in tests/schedules/test_autodiffusion.py):
- mutation always changes its parent (the reference's skip-set mutation compared instead of
  assigning, so it never changed anything);
- crossover and mutation always give K unique timesteps (the reference's crossover could repeat a
  timestep, which its ``set()`` then silently dropped: fewer than K steps);
- the final generation is ranked with the rest (the reference evaluated it after its last ranking).

The search is deterministic for a seed (one ``random.Random``), and resumable: with ``state_path`` it
writes its whole state (every fitness so far, the generation being evaluated, the generator's state)
after each evaluation, and a later run with the same arguments continues from there, giving the same
result as an uninterrupted run. ``time_budget_s`` stops a run cleanly (state saved) once it has run that long;
a resumed run gets the budget afresh.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

Candidate = tuple[int, ...]
Fitness = Callable[[Candidate], float]

STATE_VERSION = 1


@dataclass(frozen=True)
class SearchSpace:
    """K distinct integer timesteps in ``[0, num_train_timesteps)``."""

    num_steps: int
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_train_timesteps < self.num_steps + 1:
            raise ValueError(f"num_train_timesteps ({self.num_train_timesteps}) must exceed num_steps "
                             f"({self.num_steps}): mutation needs a timestep outside the candidate")

    def check(self, candidate: Sequence[int]) -> Candidate:
        """``candidate`` as a valid candidate (strictly decreasing, K long, in range), or ValueError."""
        values = tuple(int(t) for t in candidate)
        if len(values) != self.num_steps:
            raise ValueError(f"{list(values)} has {len(values)} timesteps; the search is over {self.num_steps}")
        if len(set(values)) != len(values):
            raise ValueError(f"{list(values)} repeats a timestep")
        if min(values) < 0 or max(values) >= self.num_train_timesteps:
            raise ValueError(f"{list(values)} leaves 0 .. {self.num_train_timesteps - 1}")
        return canonical(values)

    def uniform(self) -> Candidate:
        """The uniform K-step sequence with the last training timestep first (diffusers' "trailing")."""
        T, K = self.num_train_timesteps, self.num_steps
        return tuple(round(T - i * T / K) - 1 for i in range(K))


def canonical(timesteps: Sequence[int]) -> Candidate:
    """Sorted largest first, the order the sampler visits them."""
    return tuple(sorted((int(t) for t in timesteps), reverse=True))


def random_candidate(rng: random.Random, space: SearchSpace) -> Candidate:
    return canonical(rng.sample(range(space.num_train_timesteps), space.num_steps))


def mutate(parent: Candidate, rng: random.Random, space: SearchSpace, prob: float, radius: int = 0) -> Candidate:
    """Each timestep replaced with probability ``prob`` by one not already in the candidate; at least one
    is always replaced, so the child differs from its parent. With ``radius`` > 0 half the replacements
    are local: a timestep within ``radius`` of the old one (the reference draws only uniformly)."""
    genes = list(parent)
    chosen = [i for i in range(len(genes)) if rng.random() < prob]
    if not chosen:
        chosen = [rng.randrange(len(genes))]
    for i in chosen:
        present = set(genes)
        near = None
        if radius > 0 and rng.random() < 0.5:
            low, high = max(genes[i] - radius, 0), min(genes[i] + radius, space.num_train_timesteps - 1)
            near = [t for t in range(low, high + 1) if t not in present]
        genes[i] = rng.choice(near) if near else _draw_absent(rng, space, present)
    return canonical(genes)


def crossover(first: Candidate, second: Candidate, rng: random.Random, space: SearchSpace) -> Candidate:
    """Uniform position-wise crossover of two parents (both largest first). A timestep the child already
    has is replaced by the other parent's gene at that position, else by a parent gene it lacks, else by
    a random absent one: the child always has exactly K distinct timesteps."""
    child: list[int] = []
    for a, b in zip(first, second, strict=True):
        pick, other = (a, b) if rng.random() < 0.5 else (b, a)
        if pick in child:
            pick = other
        if pick in child:
            spare = [t for t in (*first, *second) if t not in child]
            pick = spare[0] if spare else _draw_absent(rng, space, set(child))
        child.append(pick)
    return canonical(child)


def _draw_absent(rng: random.Random, space: SearchSpace, present: set[int]) -> int:
    while True:
        value = rng.randrange(space.num_train_timesteps)
        if value not in present:
            return value


@dataclass(frozen=True)
class SearchConfig:
    """The evolutionary search's settings (defaults: the reference's SD script, §4.2)."""

    population: int = 50
    select: int = 10
    mutations: int = 25
    crossovers: int = 15
    mutation_prob: float = 0.1
    mutation_radius: int = 0  # > 0: half the mutated timesteps move at most this far (0: the reference)
    epochs: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2 or self.select < 1 or self.epochs < 0:
            raise ValueError("population must be >= 2, select >= 1 and epochs >= 0")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise ValueError("mutations + crossovers must be between 0 and the population")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob must be in [0, 1], got {self.mutation_prob}")
        if self.mutation_radius < 0:
            raise ValueError(f"mutation_radius must be >= 0, got {self.mutation_radius}")


@dataclass
class SearchResult:
    """Every evaluated candidate ranked best first, with the search's cost."""

    ranked: list[tuple[Candidate, float]]
    best_per_epoch: list[float]  # the best fitness after generation 0, 1, ...
    evaluations: int
    wall_time_s: float
    finished: bool  # False: stopped by the time budget (resume with the same state_path)
    rescored: list[tuple[Candidate, float]] = field(default_factory=list)

    @property
    def best(self) -> tuple[Candidate, float]:
        return self.rescored[0] if self.rescored else self.ranked[0]


class _Stop(Exception):
    pass


class EvolutionarySearch:
    """Stage 1 of AutoDiffusion over ``space`` with ``fitness`` (lower is better); see the module doc.

    ``grids`` are hand-made sequences put in generation 0 right after the uniform one and the ``seeds`` (sequences
    known to be good, e.g. an earlier search's best: generation 0's mutants take turns between each of them and
    the uniform sequence, at least one each, so the search also starts around them). With
    ``rescore``, the ``rescore_top`` best are scored again by that (costlier, e.g. more samples)
    fitness at the end and ranked by it (§4.5: compare at equal sample counts, re-score the top).
    """

    desc = "search"

    def __init__(
        self,
        space: SearchSpace,
        fitness: Fitness,
        config: SearchConfig | None = None,
        *,
        grids: Sequence[Sequence[int]] = (),
        seeds: Sequence[Sequence[int]] = (),
        state_path: str | Path | None = None,
        time_budget_s: float | None = None,
        rescore: Fitness | None = None,
        rescore_top: int = 3,
        progress: bool = False,
    ) -> None:
        self.space = space
        self.fitness = fitness
        self.config = config or SearchConfig()
        self.grids = [space.check(g) for g in grids]
        self.seeds = [space.check(s) for s in seeds]
        self.state_path = Path(state_path) if state_path is not None else None
        self.time_budget_s = time_budget_s
        self.rescore = rescore
        self.rescore_top = rescore_top
        self.progress = progress

    # --- state ---------------------------------------------------------------------------------

    def _fresh_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "identity": self._identity(), "epoch": 0, "generation": None,
                "visited": [], "best_per_epoch": [], "rng": None, "elapsed_s": 0.0, "rescored": []}

    @staticmethod
    def _encode(candidate: Any) -> Any:
        """A candidate as JSON (the state file)."""
        return list(candidate)

    @staticmethod
    def _decode(data: Any) -> Any:
        return tuple(data)

    def _identity(self) -> dict[str, Any]:
        """What a state file must match to be resumed (an unseeded search's key is unchanged by the seeds)."""
        identity = {"space": asdict(self.space), "config": asdict(self.config), "grids": [list(g) for g in self.grids]}
        if self.seeds:
            identity["seeds"] = [list(s) for s in self.seeds]
        return identity

    def _load_state(self) -> dict[str, Any]:
        if self.state_path is None or not self.state_path.is_file():
            return self._fresh_state()
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        if state.get("version") != STATE_VERSION or state.get("identity") != self._identity():
            raise ValueError(f"state file {str(self.state_path)!r} belongs to another search (other space, "
                             "settings, grids or seeds); remove it or choose another state path")
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.state_path)

    # --- the search ----------------------------------------------------------------------------

    def run(self) -> SearchResult:
        state = self._load_state()
        rng = random.Random(self.config.seed)
        if state["rng"] is not None:
            rng.setstate(_rng_from_json(state["rng"]))
        visited: dict[Any, float] = {self._decode(c): f for c, f in state["visited"]}
        started = time.perf_counter() - state["elapsed_s"]  # wall time over every run of this search
        run_started = time.perf_counter()  # the budget is per run: a resumed run gets it afresh
        total = self.config.population * (self.config.epochs + 1)
        bar = tqdm(total=total, initial=min(len(visited), total), desc=self.desc, disable=not self.progress,
                   unit="cand")
        finished = True
        try:
            while state["epoch"] <= self.config.epochs:
                if state["generation"] is None:
                    generation = self._breed(state["epoch"], visited, rng)
                    state["generation"] = [self._encode(c) for c in generation]
                    state["rng"] = _rng_to_json(rng.getstate())
                    self._save_state(state)
                for candidate in (self._decode(c) for c in state["generation"]):
                    if candidate in visited:
                        continue
                    if self.time_budget_s is not None and time.perf_counter() - run_started >= self.time_budget_s:
                        raise _Stop
                    visited[candidate] = float(self.fitness(candidate))
                    state["visited"].append([self._encode(candidate), visited[candidate]])
                    state["elapsed_s"] = time.perf_counter() - started
                    self._save_state(state)
                    bar.update(1)
                    bar.set_postfix(best=f"{min(visited.values()):.4g}")
                state["best_per_epoch"].append(min(visited.values()))
                state["epoch"] += 1
                state["generation"] = None
                self._save_state(state)
            if self.rescore is not None and not state["rescored"]:
                top = _ranked(visited)[: self.rescore_top]
                state["rescored"] = sorted(([self._encode(c), float(self.rescore(c))] for c, _ in top),
                                           key=lambda row: (row[1], row[0]))
                self._save_state(state)
        except _Stop:
            finished = False
            state["elapsed_s"] = time.perf_counter() - started
            self._save_state(state)
        finally:
            bar.close()
        return SearchResult(
            ranked=_ranked(visited),
            best_per_epoch=list(state["best_per_epoch"]),
            evaluations=len(visited),
            wall_time_s=time.perf_counter() - started,
            finished=finished,
            rescored=[(self._decode(c), f) for c, f in state["rescored"]],
        )

    def _breed(self, epoch: int, visited: dict[Candidate, float], rng: random.Random) -> list[Candidate]:
        """The candidates of generation ``epoch``, none of them already evaluated or repeated."""
        config, space = self.config, self.space
        generation: list[Candidate] = []

        def fill(make: Callable[[], Candidate], size: int) -> None:
            """Add ``make()`` until the generation has ``size`` candidates (bounded: a tiny space may run
            out of unvisited candidates)."""
            for _ in range(50 * max(size, 1)):
                if len(generation) >= size:
                    return
                candidate = make()
                if candidate not in visited and candidate not in generation:
                    generation.append(candidate)

        if epoch == 0:
            uniform = space.uniform()
            for first in (uniform, *self.seeds, *self.grids):
                fill(lambda first=first: first, len(generation) + 1)
            # at least one mutant of each seed, however full the generation already is
            mutants = max(config.population - config.population // 2 - 1 - len(self.seeds) - len(self.grids),
                          len(self.seeds))
            origins = [*self.seeds, uniform]
            turn = itertools.count()  # the mutants take turns among the origins, the seeds first

            def mutant() -> Candidate:
                origin = origins[next(turn) % len(origins)]
                return mutate(origin, rng, space, config.mutation_prob, config.mutation_radius)

            fill(mutant, len(generation) + mutants)
        else:
            parents = [c for c, _ in _ranked(visited)[: config.select]]
            fill(lambda: mutate(rng.choice(parents), rng, space, config.mutation_prob,
                                    config.mutation_radius), config.mutations)
            if len(parents) > 1:
                fill(lambda: crossover(*rng.sample(parents, 2), rng, space), len(generation) + config.crossovers)
        fill(lambda: random_candidate(rng, space), config.population)
        return generation


def _ranked(visited: dict[Candidate, float]) -> list[tuple[Candidate, float]]:
    """Best (lowest fitness) first; ties broken by the candidate itself, so the order is deterministic."""
    return sorted(visited.items(), key=lambda item: (item[1] if not math.isnan(item[1]) else math.inf, item[0]))


def _rng_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


# --- stage 2: which UNet blocks to skip at which step ------------------------------------------------------

SkipPlan = tuple[tuple[int, ...], ...]  # per step, the sorted indices (into the UNet's skippable blocks) skipped


@dataclass(frozen=True)
class SkipSpace:
    """Per-step skip sets over ``num_blocks`` blocks (L) for ``num_steps`` steps, at most ``max_skip`` skipped
    per step, under the compute budget ``cost(plan) <= budget``.

    Without ``block_costs`` every block costs 1 and a plan's cost is the number of blocks run,
    ``sum over steps of (L - |skipped|)`` (§4.1's N_max). With the measured cost model
    (``engine/block_skip.py: measure_block_costs``) block b costs ``block_costs[b]`` and every UNet call
    ``overhead`` besides (the shares of one call's time: they sum to 1), so a plan's cost is in full UNet
    calls and ``budget = 0.8 * num_steps`` means at least 20% less UNet time."""

    num_steps: int
    num_blocks: int
    budget: float
    max_skip: int
    block_costs: tuple[float, ...] | None = None
    overhead: float = 0.0

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.num_blocks < 1 or not 0 <= self.max_skip <= self.num_blocks:
            raise ValueError("need num_steps >= 1, num_blocks >= 1 and 0 <= max_skip <= num_blocks")
        if self.block_costs is not None and (len(self.block_costs) != self.num_blocks
                                             or min(self.block_costs) < 0 or self.overhead < 0):
            raise ValueError(f"block_costs must be {self.num_blocks} costs >= 0 (and overhead >= 0)")
        costs = sorted(self._costs(), reverse=True)
        lowest = self.num_steps * (self.overhead + sum(costs[self.max_skip:]))
        if not lowest <= self.budget + 1e-12:
            raise ValueError(f"budget {self.budget:g} is below the cheapest plan's cost {lowest:g} "
                             f"({self.num_steps} steps, at most {self.max_skip} of {self.num_blocks} blocks skipped "
                             "per step)")

    def _costs(self) -> tuple[float, ...]:
        return self.block_costs if self.block_costs is not None else (1,) * self.num_blocks

    def cost(self, plan: SkipPlan) -> float:
        """What the plan runs over the whole generation: blocks run, or (with block_costs) full UNet calls."""
        costs = self._costs()
        full = self.overhead + sum(costs)
        return sum(full - sum(costs[i] for i in step) for step in plan)

    def check(self, plan: SkipPlan) -> SkipPlan:
        plan = tuple(tuple(sorted({int(i) for i in step})) for step in plan)
        if len(plan) != self.num_steps:
            raise ValueError(f"plan has {len(plan)} steps, not {self.num_steps}")
        if any(i < 0 or i >= self.num_blocks for step in plan for i in step):
            raise ValueError(f"a block index leaves 0 .. {self.num_blocks - 1}")
        if any(len(step) > self.max_skip for step in plan):
            raise ValueError(f"a step skips more than {self.max_skip} blocks")
        if self.cost(plan) > self.budget + 1e-12:
            raise ValueError(f"plan runs {self.cost(plan):g} {'blocks' if self.block_costs is None else 'UNet calls'}; "
                             f"the budget is {self.budget:g}")
        return plan

    def skip_nothing(self) -> SkipPlan:
        return tuple(() for _ in range(self.num_steps))


def _over_budget_repair(steps: list[set[int]], rng: random.Random, space: SkipSpace) -> SkipPlan:
    """Add skips at random steps (with room) until the plan fits the budget; with measured costs, once every
    step skips ``max_skip`` blocks, trade a step's cheapest skipped block for a costlier one it runs."""
    costs = space._costs()
    while space.cost(tuple(tuple(s) for s in steps)) > space.budget + 1e-12:
        room = [k for k, s in enumerate(steps) if len(s) < space.max_skip]
        if room:
            k = rng.choice(room)
            steps[k].add(rng.choice([i for i in range(space.num_blocks) if i not in steps[k]]))
            continue
        trades = []
        for k, skipped in enumerate(steps):
            cheapest = min(skipped, key=lambda i: (costs[i], i))
            costlier = [i for i in range(space.num_blocks) if i not in skipped and costs[i] > costs[cheapest]]
            if costlier:
                trades.append((k, cheapest, costlier))
        k, out, costlier = rng.choice(trades)  # one exists: the budget is at least the cheapest plan's cost
        steps[k].remove(out)
        steps[k].add(rng.choice(costlier))
    return tuple(tuple(sorted(s)) for s in steps)


def random_plan(rng: random.Random, space: SkipSpace) -> SkipPlan:
    steps = [set(rng.sample(range(space.num_blocks), rng.randint(0, space.max_skip))) for _ in range(space.num_steps)]
    return _over_budget_repair(steps, rng, space)


def mutate_plan(parent: SkipPlan, rng: random.Random, space: SkipSpace, prob: float) -> SkipPlan:
    """Each step's skip set is changed with probability ``prob`` (a block added, removed or swapped for one the
    step runs: the reference compared instead of assigning here, so its skip sets never changed); at least one
    step always changes, and the child fits the budget."""
    for _ in range(100):
        steps = [set(s) for s in parent]
        chosen = [k for k in range(space.num_steps) if rng.random() < prob] or [rng.randrange(space.num_steps)]
        for k in chosen:
            absent = [i for i in range(space.num_blocks) if i not in steps[k]]
            moves = ([] if not steps[k] else ["remove"]) + (["add"] if len(steps[k]) < space.max_skip else []) + (
                ["swap"] if steps[k] and absent else [])
            if not moves:
                continue
            move = rng.choice(moves)
            if move != "add":  # remove, or swap: one skipped block for one run (a gene replaced, as for timesteps)
                steps[k].remove(rng.choice(sorted(steps[k])))
            if move != "remove":
                steps[k].add(rng.choice(absent))
        child = _over_budget_repair(steps, rng, space)
        if child != parent:
            return child
    raise ValueError("this skip space has no plan other than the parent")


def crossover_plan(first: SkipPlan, second: SkipPlan, rng: random.Random, space: SkipSpace) -> SkipPlan:
    """Each step's skip set from one parent or the other, repaired to fit the budget."""
    steps = [set(a if rng.random() < 0.5 else b) for a, b in zip(first, second, strict=True)]
    return _over_budget_repair(steps, rng, space)


class SkipPlanSearch(EvolutionarySearch):
    """Stage 2 of AutoDiffusion: with the timesteps fixed (stage 1's best), which blocks to skip at which
    step under ``space``'s compute budget; the same evolutionary loop (elitism, a visited cache, resumable
    state, time budget, re-scoring of the top), over skip plans. ``fitness`` scores a plan, lower is better.

    Generation 0 holds the caller's ``seeds`` (plans worth trying first) then random plans; mutation always
    changes a skip set (the reference's never did, §4.5) and every child fits the budget."""

    desc = "skip search"

    def __init__(self, space: SkipSpace, fitness: Callable[[SkipPlan], float], config: SearchConfig | None = None,
                 *, seeds: Sequence[SkipPlan] = (), state_path: str | Path | None = None,
                 time_budget_s: float | None = None, rescore: Callable[[SkipPlan], float] | None = None,
                 rescore_top: int = 3, progress: bool = False) -> None:
        self.space = space  # type: ignore[assignment]
        self.fitness = fitness  # type: ignore[assignment]
        self.config = config or SearchConfig()
        self.grids = [space.check(plan) for plan in seeds]  # type: ignore[misc]
        self.state_path = Path(state_path) if state_path is not None else None
        self.time_budget_s = time_budget_s
        self.rescore = rescore  # type: ignore[assignment]
        self.rescore_top = rescore_top
        self.progress = progress

    @staticmethod
    def _encode(candidate: Any) -> Any:
        return [list(step) for step in candidate]

    @staticmethod
    def _decode(data: Any) -> Any:
        return tuple(tuple(step) for step in data)

    def _identity(self) -> dict[str, Any]:
        return {"skip_space": asdict(self.space), "config": asdict(self.config),
                "seeds": [self._encode(plan) for plan in self.grids]}

    def _breed(self, epoch: int, visited: dict[Any, float], rng: random.Random) -> list[Any]:
        config, space = self.config, self.space
        assert isinstance(space, SkipSpace)
        generation: list[SkipPlan] = []

        def fill(make: Callable[[], SkipPlan], size: int) -> None:
            for _ in range(50 * max(size, 1)):
                if len(generation) >= size:
                    return
                plan = make()
                if plan not in visited and plan not in generation:
                    generation.append(plan)

        if epoch == 0:
            for seed in self.grids:
                fill(lambda seed=seed: seed, len(generation) + 1)
        else:
            parents = [c for c, _ in _ranked(visited)[: config.select]]
            fill(lambda: mutate_plan(rng.choice(parents), rng, space, config.mutation_prob), config.mutations)
            if len(parents) > 1:
                fill(lambda: crossover_plan(*rng.sample(parents, 2), rng, space), len(generation) + config.crossovers)
        fill(lambda: random_plan(rng, space), config.population)
        return generation


def greedy_plan(space: SkipSpace, order: Sequence[int]) -> SkipPlan:
    """Skip the blocks of ``order`` (best first) at every step, one block after another, until the plan fits the
    budget (a block is left out where it would exceed ``max_skip``; the last one added may overshoot the saving
    needed). The seed the probe's single-block scores give stage 2's generation 0."""
    steps: list[set[int]] = [set() for _ in range(space.num_steps)]
    for block in order:
        if space.cost(tuple(tuple(sorted(s)) for s in steps)) <= space.budget + 1e-12:
            break
        for skipped in steps:
            if len(skipped) < space.max_skip:
                skipped.add(block)
    plan = tuple(tuple(sorted(s)) for s in steps)
    if space.cost(plan) > space.budget + 1e-12:
        raise ValueError(f"skipping every block of the order at every step runs {space.cost(plan):g} UNet calls; "
                         f"the budget is {space.budget:g}")
    return plan
