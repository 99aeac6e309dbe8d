"""The training loop on short episodes, this checkout against an earlier commit, in one script.

    python benchmarks/short_episodes.py [--baseline 35d7506] [--rounds 3] [--iterations 60]

The arithmetic task's episodes are 3-4 tokens, so the loop's fixed costs (per micro-batch, per
optimizer step, per iteration) weigh more there than the model's arithmetic. The script checks the
baseline commit out into a temporary git worktree and runs ``python -m agents --task arithmetic --algo ppo
--iterations N`` from each tree in turn, ``--rounds`` times, one torch thread each, one run at a time, and
prints each run's training seconds (the sum of ``perf/iteration_s``; imports and model loading excluded)
and the ratio of the medians, this checkout over the baseline. The default baseline, ``35d7506``, is the
commit before the update's speed work (packing, the sparse embedding gradient, fused Adam).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agents.logger import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def training_seconds(tree: Path, iterations: int, run_dir: Path) -> float:
    command = [sys.executable, "-m", "agents", "--task", "arithmetic", "--algo", "ppo", "--iterations", str(iterations)]
    command += ["--run-dir", str(run_dir), "--no-progress", "--checkpoint-every", str(iterations)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return sum(row["perf/iteration_s"] for row in rows if "perf/iteration_s" in row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="35d7506", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            seconds: dict[str, list[float]] = {"baseline": [], "this checkout": []}
            for i in range(args.rounds):
                for name, tree in (("baseline", baseline), ("this checkout", ROOT)):
                    run_dir = Path(scratch) / f"{name.replace(' ', '-')}-{i}"
                    seconds[name].append(training_seconds(tree, args.iterations, run_dir))
                    print(f"round {i}: {name} {seconds[name][-1]:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"arithmetic task, PPO, {args.iterations} iterations, 1 thread, training seconds (median of {args.rounds}):")
    print(f"  baseline {args.baseline}: {medians['baseline']:.2f} s; this checkout: {medians['this checkout']:.2f} s")
    print(f"  this checkout / baseline: {medians['this checkout'] / medians['baseline']:.2f}x")
    print(f"  load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
