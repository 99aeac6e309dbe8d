"""The README's figures of `python -m agents` on the default task: the defaults over three seeds, and each
algorithm at one token budget.

    python benchmarks/default_task.py --out runs/default_task [--jobs 2]

Runs, each with one torch thread (``--jobs`` at once):

- ``defaults``: ``python -m agents --seed S`` for seeds 0, 1, 2 (60 iterations of 64 episodes);
- ``token budget``: ``python -m agents --iterations 100 --token-budget 30000 --algo ALGO --seed 0`` for PPO with
  the shared critic, PPO with a separate one (``--no-share-backbone``), RLOO and GRPO.

From each run's ``metrics.jsonl``: the evaluation before training and after it (128 episodes of the held-out
prompts: ``eval/positive_rate``, ``eval/score``, ``eval/kl``), the iterations run and the training seconds (the
sum of ``perf/iteration_s``). Writes ``docs/results/default_task.json`` (``--results``) with the commands (the
output directory written as OUT) and the library's commit, which must be clean (commit first).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agents.logger import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from recipes import commit  # noqa: E402

SEEDS = (0, 1, 2)
BUDGET = {
    "PPO, shared critic": ["--algo", "ppo"],
    "PPO, separate critic": ["--algo", "ppo", "--no-share-backbone"],
    "RLOO": ["--algo", "rloo"],
    "GRPO": ["--algo", "grpo"],
}
EVAL = ("eval/positive_rate", "eval/score", "eval/kl")


def one_run(flags: list[str], run_dir: Path, out: Path) -> dict:
    """Train one run; its evaluations before and after, iterations and training seconds."""
    train = ["agents", *flags, "--run-dir", str(run_dir), "--no-progress", "--checkpoint-every", "1000"]
    subprocess.run(
        [sys.executable, "-m", *train], check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL
    )
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evaluations = [row for row in rows if EVAL[0] in row]
    trained = [row for row in rows if "perf/iteration_s" in row]
    result = {
        "before": {key: evaluations[0][key] for key in EVAL},
        "after": {key: evaluations[-1][key] for key in EVAL},
        "iterations": len(trained),
        "training_seconds": round(sum(row["perf/iteration_s"] for row in trained), 1),
        "command": "python -m " + shlex.join(train).replace(str(out), "OUT"),
    }
    print(f"{run_dir.name}: {result['after']} after {result['iterations']} iterations", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the runs go")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on one torch thread)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "default_task.json")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    library = commit()
    jobs = [(["--seed", str(seed)], args.out / f"defaults-{seed}") for seed in SEEDS]
    budget = ["--iterations", "100", "--token-budget", "30000", "--seed", "0"]
    jobs += [([*flags, *budget], args.out / f"budget-{i}") for i, flags in enumerate(BUDGET.values())]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: one_run(*job, args.out), jobs))
    summary = {
        "commit": library,
        "cpu_count": os.cpu_count(),
        "jobs": args.jobs,
        "defaults": dict(zip(map(str, SEEDS), done[: len(SEEDS)], strict=True)),
        "token budget": dict(zip(BUDGET, done[len(SEEDS) :], strict=True)),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(summary, indent=2) + "\n")
    if commit() != library:
        sys.exit("the library's commit changed during the runs; run it again")


if __name__ == "__main__":
    main()
