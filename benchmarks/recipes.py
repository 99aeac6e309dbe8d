"""Each recipe's held-out accuracy on the arithmetic and calculator tasks, 3 seeds, one sample budget.

    python benchmarks/recipes.py --out runs/recipes [--tasks arithmetic calculator] [--jobs 2]

For every task, every entry of ``RUNS`` (the two default algorithms and each ``--recipe``) and every
seed it trains ``python -m agents --task TASK ... --iterations N --seed S`` (the README's budget for the
task: 200 iterations of 64 episodes on arithmetic, 100 on calculator; every other setting the
recipe's or the default) and evaluates the final policy with ``python -m agents.evaluate --task TASK
--policy RUN/final`` (the task's 200 held-out prompts, 4 samples each). Each process uses one torch
thread; ``--jobs`` runs that many at once. It writes ``docs/results/recipes/TASK.json`` (``--results``):
per run the accuracy, pass@4, KL to the SFT policy, response length and training seconds, the commands
(the output directory written as OUT), and the git commit of the library that ran, which must be clean
(commit first: the figures name the code that made them). ``--runs NAME ...`` trains those entries only
and replaces them in the JSON already there, keeping the others; each run records its own commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
ITERATIONS = {"arithmetic": 200, "calculator": 100}
EARLIER_CRITIC = ["--value-layer", "2", "--no-normalize-value-loss", "--vf-coef", "0.1", "--clip-range-value", "0.2"]
RUNS = {
    "ppo (default)": ["--algo", "ppo"],
    "ppo (earlier critic)": ["--algo", "ppo", *EARLIER_CRITIC],  # the value settings before docs/design.md's change
    "ppo (value head at 3x)": ["--algo", "ppo", "--value-lr-scale", "3"],  # the head's learning rate 3x the trunk's
    "grpo (default)": ["--algo", "grpo"],
    **{recipe: ["--recipe", recipe] for recipe in ("grpo", "dr_grpo", "dapo", "gspo", "cispo", "dual_clip")},
    "reinforce_pp": ["--recipe", "reinforce_pp"],
}
FIGURES = ("accuracy", "pass@4", "kl", "response_length")


def commit() -> str:
    """The library's commit; refuses a tree whose agents/ or textenv/ differ from it."""
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "agents", "textenv"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    if changed.strip():
        sys.exit(f"agents/ or textenv/ have uncommitted changes:\n{changed}commit them (or run from a clean checkout)")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def one_run(task: str, name: str, seed: int, out: Path) -> dict:
    """Train and evaluate one (recipe, seed); returns its figures and commands."""
    slug = name.replace(" (", "-").replace(")", "").replace(" ", "-")  # "ppo (default)" -> "ppo-default"
    run_dir = out / task / f"{slug}-{seed}"
    iterations = str(ITERATIONS[task])
    train = ["agents", "--task", task, *RUNS[name], "--iterations", iterations, "--seed", str(seed)]
    train += ["--run-dir", str(run_dir), "--no-progress", "--checkpoint-every", iterations]
    evaluate = ["agents.evaluate", "--task", task, "--policy", f"{run_dir}/final", "--json", f"{run_dir}/eval.json"]
    threads = os.environ | {"OMP_NUM_THREADS": "1"}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", *train], check=True, env=threads, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    subprocess.run([sys.executable, "-m", *evaluate], check=True, env=threads, stdout=subprocess.DEVNULL)
    result = json.loads((run_dir / "eval.json").read_text())
    figures = {key: result[key] for key in FIGURES}
    print(f"{task:10s} {name:15s} seed {seed}: accuracy {figures['accuracy']:.3f} ({seconds:.0f} s)", flush=True)
    commands = ["python -m " + shlex.join(command).replace(str(out), "OUT") for command in (train, evaluate)]
    return {"seed": seed, "seconds": round(seconds, 1), **figures, "commands": commands}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the runs go")
    parser.add_argument("--tasks", nargs="+", choices=sorted(ITERATIONS), default=sorted(ITERATIONS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on one torch thread)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "recipes")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), help="only these entries (the JSON keeps the rest)")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    library = commit()
    names = args.runs or list(RUNS)
    for task in args.tasks:
        path = args.results / f"{task}.json"
        if args.runs and not path.is_file():
            parser.error(f"--runs: {path} does not exist yet; run every entry first (no --runs)")
        jobs = [(task, name, seed, args.out) for name in names for seed in SEEDS]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda job: one_run(*job), jobs))
        kept = json.loads(path.read_text()) if args.runs else {"runs": {}}
        old_commit = kept.pop("commit", None)  # files written before each run kept its own
        old = {
            name: [run | {"commit": run.get("commit", old_commit)} for run in kept["runs"][name]]
            for name in kept["runs"]
        }
        runs = {name: [] if name in names else old.get(name, []) for name in RUNS}
        for (_, name, _, _), result in zip(jobs, done, strict=True):
            runs[name].append(result | {"commit": library})  # checked clean at the start (and again at the end)
        summary = {"task": task, "iterations": ITERATIONS[task], "episodes_per_iteration": 64, "eval_samples": 4}
        summary |= {"cpu_count": os.cpu_count(), "jobs": args.jobs, "runs": runs}
        args.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n")
    if commit() != library:
        sys.exit("the library's commit changed during the runs; run it again")


if __name__ == "__main__":
    main()
