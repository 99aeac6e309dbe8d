"""How much of the return the critic explains, shared trunk against separate, and how fast the actor learns.

    python benchmarks/critic_ev.py --seeds 0 1 2 --iterations 30

For each seed and each critic (``shared``: the value head on the policy's trunk, the default;
``separate``: ``--no-share-backbone``, a critic trunk initialised from the reward model) it runs
``python -m agents --iterations N --seed S`` on the embedded default task, one run at a time with one
torch thread, and reads the run's ``metrics.jsonl``:

- ``EV``: ``ppo/explained_variance`` (of the rollout's values against its GAE returns, before the
  update) averaged over the second half of the run (iterations 15-29 of 30);
- ``pos@10``, ``pos@N``: ``eval/positive_rate`` of the evaluation after 10 and after N iterations
  (128 held-out episodes each, ``--eval-every 10``).

Flags after ``--`` go to every run (``-- --vf-coef 0.5``). The table is printed and written as JSON
(``docs/results/critic_ev.json`` by default), under ``--label`` beside the labels already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CRITICS = {"shared": [], "separate": ["--no-share-backbone"]}
EV_KEY, RATE_KEY = "ppo/explained_variance", "eval/positive_rate"


def run(seed: int, iterations: int, critic: str, extra: list[str], run_dir: Path) -> dict:
    """One training run; its EV over the second half and its positive rates at iteration 10 and at the end."""
    command = [sys.executable, "-m", "agents", "--iterations", str(iterations), "--seed", str(seed)]
    command += ["--run-dir", str(run_dir), "--no-progress", "--checkpoint-every", str(iterations)]
    command += CRITICS[critic] + extra
    began = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    second_half = [row[EV_KEY] for row in rows if iterations // 2 <= row["iteration"] < iterations and EV_KEY in row]
    rates = {row["iteration"]: row[RATE_KEY] for row in rows if RATE_KEY in row}
    return {
        "seed": seed,
        "critic": critic,
        "ev_second_half": sum(second_half) / len(second_half),
        "ev_per_iteration": [row.get(EV_KEY) for row in rows if row["iteration"] < iterations],
        "positive_rate": {str(k): v for k, v in sorted(rates.items())},
        "seconds": round(seconds, 1),
    }


def table(results: list[dict], iterations: int) -> str:
    half = iterations // 2
    lines = [f"| critic | seed | EV {half}-{iterations - 1} | pos@0 | pos@10 | pos@{iterations} |", "| --- " * 6 + "|"]
    for r in results:
        rate = r["positive_rate"]
        cells = [f"{rate.get(str(i), float('nan')):.3f}" for i in (0, 10, iterations)]
        lines.append(f"| {r['critic']} | {r['seed']} | {r['ev_second_half']:.3f} | " + " | ".join(cells) + " |")
    for critic in dict.fromkeys(r["critic"] for r in results):
        mine = [r for r in results if r["critic"] == critic]
        ev = sum(r["ev_second_half"] for r in mine) / len(mine)
        at = (0, 10, iterations)
        means = [sum(r["positive_rate"].get(str(i), float("nan")) for r in mine) / len(mine) for i in at]
        lines.append(f"| {critic} | mean | {ev:.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--critics", nargs="+", choices=list(CRITICS), default=list(CRITICS))
    parser.add_argument("--output", type=Path, default=Path("docs/results/critic_ev.json"))
    parser.add_argument("--label", default="current", help="the key of these runs in the JSON (others are kept)")
    parser.add_argument("extra", nargs="*", help="flags for every run, after --")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for critic in args.critics:
            for seed in args.seeds:
                results.append(run(seed, args.iterations, critic, args.extra, Path(scratch) / f"{critic}-{seed}"))
                r = results[-1]
                print(f"{critic} seed {seed}: EV {r['ev_second_half']:.3f}, {r['positive_rate']}, {r['seconds']} s")
    print(table(results, args.iterations))
    command = ["python", "benchmarks/critic_ev.py", *sys.argv[1:]]
    report = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report[args.label] = {"command": " ".join(command), "iterations": args.iterations, "runs": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
