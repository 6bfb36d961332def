"""The seeded constrained search for the paired-distance line of issue #18 (docs/benchmarks.md, AutoDiffusion).

    nice -n 10 python benchmarks/search_seeded.py --dir <scratch> --out benchmarks/results/search_seeded_cpu.json

GHVB 0.8 at CFG 5, K = 4, fitness ``paired_distance`` with ``--min-accuracy 0.92``, generation 0 seeded with the
best sequence found so far ([897, 818, 700, 71]: x0.63 of the uniform schedule's paired distance at 0.929 held-out
accuracy), one search per ``--seeds`` value, each under a ``--budget-minutes`` wall-time budget per run. A search
the budget stops is resumed by running the same command again (its state file holds every score; each run gets
the budget afresh), up to ``--max-runs`` runs, so every search ends with an artifact whose wall time adds up its
runs. The winner is the artifact with the best fitness on the *search* prompts (never chosen on the held-out ones);
``benchmarks/search.py`` then compares it with the uniform schedule and the hand-made grids on the held-out prompts.
Each search is a real ``accel-diffusion search`` process; ``--search-args`` and ``--bench-args`` shrink them for a
smoke run (tests/schedules/test_search_seeds.py does not run this script; see docs/benchmarks.md for the check).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SAMPLER = '{"name":"ghvb","order":0.8}'
SEED_TIMESTEPS = "897,818,700,71"
# the 300-candidate settings of the quiet-machine search (5.0 min there): 49 search prompts, the top 3 re-scored on 98
SEARCH_ARGS = ("--images 49 --rescore-images 98 --population 20 --select 5 --mutations 10 --crossovers 6 --epochs 14 "
               "--mutation-radius 60")


def search_command(schedules_dir: Path, schedule_id: str, seed: int, budget_minutes: float, extra: str) -> list[str]:
    program = shutil.which("accel-diffusion") or str(Path(sys.executable).with_name("accel-diffusion"))
    return [program, "search", "--model", "shapes", "--steps", "4", "--sampler", SAMPLER,
            "--guidance-scale", "5", "--fitness", "paired_distance", "--min-accuracy", "0.92",
            "--seed-timesteps", SEED_TIMESTEPS, "--seed", str(seed), "--budget-minutes", f"{budget_minutes:g}",
            "--dir", str(schedules_dir), "--out", schedule_id, *shlex.split(extra)]


def run_search(command: list[str], artifact: Path, max_runs: int) -> int:
    """Run ``command`` until it writes ``artifact`` (exit 0) or ``max_runs`` runs; the number of runs made."""
    for run in range(1, max_runs + 1):
        print("$", shlex.join(command), flush=True)
        code = subprocess.run(command, check=False).returncode
        if code == 0 and artifact.is_file():
            return run
        if code != 3:  # 3: the budget ran out, the state file is kept
            sys.exit(f"accel-diffusion search failed with exit status {code}")
    sys.exit(f"{artifact.stem}: not finished after {max_runs} runs (run this again to go on)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="scratch folder for the artifacts and state files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_seeded_cpu.json"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-minutes", type=float, default=5.0, help="per run of a search")
    parser.add_argument("--max-runs", type=int, default=4, help="runs of one search at most (resumed)")
    parser.add_argument("--search-args", default=SEARCH_ARGS, help="the search's size (accel-diffusion search flags)")
    parser.add_argument("--bench-args", default="", help="extra flags of benchmarks/search.py (e.g. --images 4)")
    parser.add_argument("--prefix", default="shapes-ghvb0.8-cfg5-4-seeded")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    args.dir.mkdir(parents=True, exist_ok=True)
    searches: list[dict[str, Any]] = []
    load = os.getloadavg()
    for seed in args.seeds:
        schedule_id = f"{args.prefix}-s{seed}"
        path = args.dir / f"{schedule_id}.json"
        started = time.perf_counter()
        runs = 0 if path.is_file() else run_search(
            search_command(args.dir, schedule_id, seed, args.budget_minutes, args.search_args), path, args.max_runs)
        artifact = json.loads(path.read_text())
        searches.append({"id": schedule_id, "seed": seed, "runs": runs, "timesteps": artifact["timesteps"],
                         "fitness": artifact["fitness"], "search": artifact["search"],
                         "wall_s_this_call": time.perf_counter() - started})
        print(f"{schedule_id}: {artifact['timesteps']} fitness {artifact['fitness']['value']:.4g} "
              f"({artifact['search']['evaluations']} candidates, {artifact['search']['wall_time_s'] / 60:.1f} min, "
              f"{runs} run(s))", flush=True)
    winner = min(searches, key=lambda s: (s["fitness"]["value"], s["seed"]))
    held_out = args.out.with_name(args.out.stem + "_held_out.json")
    bench = [sys.executable, str(Path(__file__).parent / "search.py"), "--ids", winner["id"], "--out", str(held_out),
             *shlex.split(args.bench_args)]
    print("$", shlex.join(bench), flush=True)
    subprocess.run(bench, check=True, env={**env, "ACCEL_DIFFUSION_SCHEDULES_DIR": str(args.dir)})
    report = {"load_avg_start": load, "load_avg_end": os.getloadavg(), "searches": searches, "winner": winner["id"],
              "held_out": json.loads(held_out.read_text())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    run = report["held_out"]["runs"][0]
    print(f"winner {winner['id']} (chosen on the search prompts): held-out accuracy "
          f"{run['searched']['prompt_accuracy']:.3f}, paired distance x{run['paired_distance_vs_uniform']:.2f} of "
          f"uniform (line: <= 0.6 at >= 0.90)")


if __name__ == "__main__":
    main()
