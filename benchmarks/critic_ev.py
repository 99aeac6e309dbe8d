"""How much of the return the critic explains, shared trunk against separate, and how fast the actor learns.

    python benchmarks/critic_ev.py --seeds 0 1 2 --iterations 30

For each seed and each critic (``shared``: the value head on the policy's trunk, the default;
``separate``: ``--no-share-backbone``, a critic trunk initialised from the reward model; ``separate-policy``: a
critic trunk initialised from the policy, ``--critic-init policy``, which knows what the shared trunk knows) it runs
``python -m agents --iterations N --seed S`` on the embedded default task, one run at a time with one
torch thread, and reads the run's ``metrics.jsonl``:

- ``EV``: ``ppo/explained_variance`` (of the rollout's values against its GAE returns, before the
  update) averaged over the second half of the run (iterations 15-29 of 30);
- ``pos@10``, ``pos@N``: ``eval/positive_rate`` of the evaluation after 10 and after N iterations
  (128 held-out episodes each, ``--eval-every 10``), with ``eval/score`` and ``eval/kl`` beside it;
- ``train score``: ``env/score``, the reward-model score of the training rollouts, averaged over updates
  1-10 and 1-N (64 episodes each): how fast the actor learns per sample;
- where the critic has a value prior, ``ppo/prior_weight`` after each update (in the JSON only).

``trl`` (with ``--trl-python``, the interpreter of the peer harness's virtual environment) runs TRL's PPO
trainer on the same task and shape instead (``benchmarks/trl_snapshots.py``: TRL's value model is a copy of the
reward model, like ``separate``), saves its policy after update 10 and N, and evaluates each snapshot with
``python -m agents.evaluate --k 4`` (every eval prompt 4 times: 224 episodes, where a textenv run's own
evaluation samples 128); it has no EV.

Flags after ``--`` go to every textenv run (``-- --vf-coef 0.5``). The table is printed and written as JSON
(``docs/results/critic_ev.json`` by default), under ``--label`` beside the labels already there, after
every run. ``--doc-table LABEL ...`` prints docs/design.md's table of those labels from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CRITICS = {
    "shared": [],
    "separate": ["--no-share-backbone"],
    "separate-policy": ["--no-share-backbone", "--critic-init", "policy"],
    "trl": None,
}
EV_KEY, RATE_KEY, SCORE_KEY, KL_KEY = "ppo/explained_variance", "eval/positive_rate", "env/score", "eval/kl"
EVAL_SCORE_KEY = "eval/score"
PRIOR_KEY = "ppo/prior_weight"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from trl_snapshots import HARNESS, harness_flags  # noqa: E402

THREAD = {"OMP_NUM_THREADS": "1"}
PIPE = {"stdout": subprocess.PIPE, "text": True}


def run(seed: int, iterations: int, critic: str, extra: list[str], run_dir: Path) -> dict:
    """One training run; its EV over the second half and its positive rates at iteration 10 and at the end."""
    from agents.logger import read_jsonl

    command = [sys.executable, "-m", "agents", "--iterations", str(iterations), "--seed", str(seed)]
    command += ["--run-dir", str(run_dir), "--no-progress", "--checkpoint-every", str(iterations)]
    command += CRITICS[critic] + extra
    began = time.perf_counter()
    subprocess.run(command, check=True, env=os.environ | THREAD, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    rows = read_jsonl(run_dir / "metrics.jsonl")
    second_half = [row[EV_KEY] for row in rows if iterations // 2 <= row["iteration"] < iterations and EV_KEY in row]
    rates = {row["iteration"]: row[RATE_KEY] for row in rows if RATE_KEY in row}
    kls = {str(row["iteration"]): row[KL_KEY] for row in rows if KL_KEY in row}
    scores = {str(row["iteration"]): row[EVAL_SCORE_KEY] for row in rows if EVAL_SCORE_KEY in row}
    return {
        "seed": seed,
        "critic": critic,
        "ev_second_half": sum(second_half) / len(second_half),
        "ev_per_iteration": [row.get(EV_KEY) for row in rows if row["iteration"] < iterations],
        "positive_rate": {str(k): v for k, v in sorted(rates.items())},
        "kl": kls,
        "eval_score": scores,
        "score_per_iteration": [row[SCORE_KEY] for row in rows if row["iteration"] < iterations and SCORE_KEY in row],
        "seconds": round(seconds, 1),
    } | ({"prior_weight_per_iteration": weights} if (weights := prior_weights(rows, iterations)) else {})


def prior_weights(rows: list[dict], iterations: int) -> list[float]:
    """``ppo/prior_weight`` after each update, where the critic has a value prior (empty where it has none)."""
    return [row[PRIOR_KEY] for row in rows if row["iteration"] < iterations and PRIOR_KEY in row]


def run_trl(seed: int, iterations: int, trl_python: str, trl_harness: Path, run_dir: Path) -> dict:
    """TRL's PPO on the default task at textenv's default shape; its policy's positive rate after update 10 and N."""
    from textenv.default_task import ARTIFACTS_DIR

    models = [str(ARTIFACTS_DIR / name) for name in ("policy", "reward_model", "prompts_train.txt")]
    shape = dict(updates=iterations, batch_size=64, minibatch_size=16)  # textenv's defaults on this task
    harness = harness_flags(*models, **shape, threads=1, seed=seed)
    at = sorted({min(10, iterations), iterations})
    snapshots = [trl_python, str(REPO / "benchmarks" / "trl_snapshots.py"), "--harness", str(trl_harness)]
    snapshots += ["--out", str(run_dir)]
    began = time.perf_counter()
    quiet = dict(check=True, env=os.environ | THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trained = subprocess.run([*snapshots, "--save-at", *map(str, at), "--", *harness], **quiet | PIPE)
    updates = [json.loads(line) for line in trained.stdout.splitlines() if line.startswith('{"update"')]
    seconds = time.perf_counter() - began
    rates, kls, scores = {}, {}, {}
    for update in at:
        figures = run_dir / f"eval_{update}.json"
        evaluate = [sys.executable, "-m", "agents.evaluate", "--policy", str(run_dir / f"update_{update}")]
        evaluate += ["--reference-model", str(ARTIFACTS_DIR / "policy"), "--k", "4", "--seed", str(seed)]
        subprocess.run([*evaluate, "--json", str(figures), "--device", "cpu"], **quiet)
        evaluation = json.loads(figures.read_text())
        rates[str(update)], kls[str(update)] = evaluation["positive_rate"], evaluation["kl"]
        scores[str(update)] = evaluation["score"]
    return {
        "seed": seed,
        "critic": "trl",
        "ev_second_half": None,
        "ev_per_iteration": None,
        "positive_rate": rates,
        "kl": kls,
        "eval_score": scores,
        "score_per_iteration": [row["score"] for row in updates],
        "seconds": round(seconds, 1),
    }


def figures(r: dict, iterations: int) -> list[float | None]:
    """A run's row: EV over the second half, eval positive rate at 0, 10 and N, mean training score of 1-10, 1-N,
    eval score at 10 and N, eval KL per response at N."""
    rate, scores = r["positive_rate"], r.get("score_per_iteration") or []
    early, whole = (mean(scores[:n]) if len(scores) >= n else None for n in (min(10, iterations), iterations))
    kl, score = r.get("kl", {}).get(str(iterations)), r.get("eval_score", {})
    evaluated = [score.get(str(i)) for i in (10, iterations)]
    return [r["ev_second_half"], *(rate.get(str(i)) for i in (0, 10, iterations)), early, whole, *evaluated, kl]


def by_critic(runs: list[dict], iterations: int, columns: list[int] | None = None) -> list[tuple[str, str, list]]:
    """(critic, seed, figures) of each run, its ``figures`` (those at ``columns``, else all), then after each critic's
    runs its mean ("mean" as the seed), critics in the order they first appear."""
    grouped: dict[str, list[tuple[str, list]]] = {}
    for r in runs:
        row = figures(r, iterations)
        grouped.setdefault(r["critic"], []).append(
            (str(r["seed"]), row if columns is None else [row[i] for i in columns])
        )
    rows = []
    for critic, seeded in grouped.items():
        rows += [(critic, seed, values) for seed, values in seeded]
        rows.append((critic, "mean", [mean(list(column)) for column in zip(*(values for _, values in seeded))]))
    return rows


def table(results: list[dict], iterations: int) -> str:
    head = ["critic", "seed", f"EV {iterations // 2}-{iterations - 1}", "pos@0", "pos@10", f"pos@{iterations}"]
    head += ["train score 1-10", f"train score 1-{iterations}", "eval score at 10", f"eval score at {iterations}"]
    head += [f"eval KL at {iterations}"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for critic, seed, values in by_critic(results, iterations):
        lines.append(f"| {critic} | {seed} | " + " | ".join(map(cell, values)) + " |")
    return "\n".join(lines)


DOC_HEAD = ["runs", "critic", "seed", "EV 15-29", "pos@10", "pos@30", "train score 1-10", "train score 1-30"]
DOC_HEAD += ["eval score at 10", "eval KL at 30"]
DOC_COLUMNS = [0, 2, 3, 4, 5, 6, 8]  # of ``figures``: EV, pos@10, pos@N, train scores, eval score at 10, KL at N


def doc_rows(report: dict, labels: list[str]) -> list[str]:
    """docs/design.md's table of the runs under ``labels`` in the JSON: each run, then each critic's mean."""
    rows = ["| " + " | ".join(DOC_HEAD) + " |", "| --- " * len(DOC_HEAD) + "|"]
    for label in labels:
        for critic, seed, values in by_critic(report[label]["runs"], report[label]["iterations"], DOC_COLUMNS):
            rows.append(f"| {label} | {critic} | {seed} | " + " | ".join(map(cell, values)) + " |")
    return rows


def plot(report: dict, labels: list[str], path: Path) -> None:
    """Explained variance over iterations, one panel per label and critic (each seed a line), and the training
    score over updates of every run of those labels, TRL's included."""
    from matplotlib.figure import Figure

    panels = [
        (label, critic) for label in labels for critic in dict.fromkeys(r["critic"] for r in report[label]["runs"])
    ]
    with_ev = [(label, critic) for label, critic in panels if critic != "trl"]
    rows = (len(with_ev) + 3) // 3  # three panels a row, the training score last
    fig = Figure(figsize=(12.6, 3.6 * rows))
    axes = list(fig.subplots(rows, 3, squeeze=False).flat)
    for ax in axes[len(with_ev) + 1 :]:
        ax.set_visible(False)
    colors = {0: "tab:blue", 1: "tab:orange", 2: "tab:green", 3: "tab:red", 4: "tab:purple"}
    for ax, (label, critic) in zip(axes, with_ev):
        for r in report[label]["runs"]:
            if r["critic"] == critic:
                ax.plot(r["ev_per_iteration"], color=colors.get(r["seed"], "grey"), lw=1.2, label=f"seed {r['seed']}")
        ax.axhline(0.4, color="grey", ls="--", lw=0.8)
        ax.axvspan(14.5, 29.5, color="grey", alpha=0.08)
        ax.set(title=f"{label}: {critic} critic", xlabel="iteration", ylabel="explained variance", ylim=(-0.6, 1))
        ax.legend(fontsize=7)
    styles, score = {}, axes[len(with_ev)]
    for label, critic in panels:
        for r in report[label]["runs"]:
            if r["critic"] == critic and r.get("score_per_iteration"):
                name = f"{label}, {critic}"
                style = styles.setdefault(name, f"C{len(styles)}")
                score.plot(
                    r["score_per_iteration"], color=style, lw=1, alpha=0.8, label=name if r["seed"] == 0 else None
                )
    score.set(title="training score per update (every seed)", xlabel="update", ylabel="mean reward-model score")
    score.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def mean(values: list[float | None]) -> float | None:
    """The mean, or None where a run has no such figure (TRL: no EV, no evaluation before training)."""
    return None if None in values else sum(values) / len(values)


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--critics", nargs="+", choices=list(CRITICS), default=["shared", "separate"])
    parser.add_argument("--trl-python", help="TRL's interpreter (the peer harness's virtual environment), for 'trl'")
    parser.add_argument("--trl-harness", type=Path, default=HARNESS, help="the peer harness, trl_ppo_bench.py")
    parser.add_argument("--output", type=Path, default=Path("docs/results/critic_ev.json"))
    parser.add_argument("--label", default="current", help="the key of these runs in the JSON (others are kept)")
    parser.add_argument("extra", nargs="*", help="flags for every run, after --")
    parser.add_argument("--doc-table", nargs="+", metavar="LABEL", help="print docs/design.md's table of these labels")
    parser.add_argument("--plot", type=Path, help="draw explained variance and training score of --plot-labels here")
    parser.add_argument("--plot-labels", nargs="+", default=["before", "before, separate", "after", "value prior"])
    args = parser.parse_args()
    if args.doc_table or args.plot:  # from the JSON; nothing runs
        report = json.loads(args.output.read_text())
        if args.doc_table:
            print("\n".join(doc_rows(report, args.doc_table)))
        if args.plot:
            plot(report, args.plot_labels, args.plot)
        return
    if "trl" in args.critics and not (args.trl_python and Path(args.trl_python).is_file()):
        parser.error(f"--critics trl needs --trl-python, the path of TRL's python; got {args.trl_python!r}")
    if "trl" in args.critics and not args.trl_harness.is_file():
        parser.error(f"--trl-harness: {args.trl_harness} is not a file; pass the path of trl_ppo_bench.py")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for critic in args.critics:
            for seed in args.seeds:
                run_dir = Path(scratch) / f"{critic}-{seed}"
                if critic == "trl":
                    results.append(run_trl(seed, args.iterations, args.trl_python, args.trl_harness, run_dir))
                else:
                    results.append(run(seed, args.iterations, critic, args.extra, run_dir))
                r = results[-1]
                print(f"{critic} seed {seed}: EV {cell(r['ev_second_half'])}, {r['positive_rate']}, {r['seconds']} s")
                save(args, results)  # after every run: a failure later keeps what was measured
    print(table(results, args.iterations))


def save(args: argparse.Namespace, results: list[dict]) -> None:
    command = ["python", "benchmarks/critic_ev.py", *sys.argv[1:]]
    report = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report[args.label] = {"command": shlex.join(command), "iterations": args.iterations, "runs": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
