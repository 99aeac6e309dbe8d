"""The README's tables of measured figures, as the JSON files the runs wrote in docs/results/ say they read.

    python -m tests.e2e.readme_tables        rewrite those figures in README.md from the JSON, printing each row
                                             it changed

A table is found by its header row, a row by its leading cells (its label); the cells after the label are the
figures. ``tests/e2e/test_readme.py`` checks that README.md reads as this would write it, so after a benchmark
or an evaluation writes new JSON, this command updates the README and the test passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"


@dataclass
class Table:
    name: str
    header: str
    """The table's header row, whole."""
    rows: list[tuple[list[str], list[str]]] = field(default_factory=list)
    """(label cells, figure cells) of each row, in the README's order."""
    open_label: bool = False
    """The label's last cell only starts with the label given (the README says more there, e.g. the flag)."""


def percent(rate: float) -> str:
    """A rate as the README prints it: 100% whole, else to a tenth of a percent."""
    return "100%" if rate == 1 else f"{100 * rate:.1f}%"


def read(*parts: str) -> dict:
    return json.loads(RESULTS.joinpath(*parts).read_text())


def pipeline_table() -> Table:
    summary = read("pipeline", "summary.json")
    sft, rm, evaluation = summary["sft"], summary["reward_model"], summary["evaluation"]
    table = Table("pipeline (docs/results/pipeline/summary.json)", "| step | figure | before | after | wall time |")
    table.rows = [
        (
            ["1. SFT, from scratch", "held-out loss per response token"],
            [f"{sft['eval_loss_before']:.2f}", f"{sft['eval_loss_after']:.3f}", f"{sft['seconds']:.0f} s"],
        ),
        (
            ["2. reward model, from the SFT policy", "held-out pairwise accuracy"],
            [f"{rm['accuracy_before']:.3f}", f"{rm['accuracy_after']:.3f}", f"{rm['seconds']:.0f} s"],
        ),
        (
            ["3. PPO, 60 iterations", "eval score (calibrated reward model)"],
            [
                f"{evaluation['sft']['score']:.3f}",
                f"{evaluation['ppo']['score']:.3f}",
                f"{summary['ppo']['seconds']:.0f} s",
            ],
        ),
        (
            ["evaluation, 16 held-out complaints x 8", "share of replies scored above 0"],
            [
                f"{100 * evaluation['sft']['score_gt0_rate']:.1f}%",
                f"{100 * evaluation['ppo']['score_gt0_rate']:.1f}%",
                f"{evaluation['seconds']:.0f} s",
            ],
        ),
    ]
    return table


def algorithm_seed_table(name: str, header: str, runs: dict[str, list[dict]], figures) -> Table:
    """A table of a row per algorithm (GRPO, then PPO) and seed: ``figures(run)`` after the label."""
    table = Table(name, header)
    for algo in ("GRPO", "PPO"):
        table.rows += [([algo, str(run["seed"])], figures(run)) for run in runs[algo]]
    return table


def calculator_table() -> Table:
    sft = read("calculator", "sft.json")
    runs = {algo: [read("calculator", f"{algo.lower()}-{seed}.json") | {"seed": seed} for seed in (0, 1, 2)]
            for algo in ("GRPO", "PPO")}  # fmt: skip

    def figures(run: dict) -> list[str]:
        before_after = [f"{100 * sft['accuracy']:.1f}%", f"{100 * run['accuracy']:.1f}%"]
        return before_after + [f"{sft['replies']:.3f}", f"{run['replies']:.2f}", f"{run['kl']:.2f}"]

    header = "| algorithm | seed | success before (SFT) | success after | calls per episode before | after "
    return algorithm_seed_table("calculator (docs/results/calculator/)", header + "| KL after (nats) |", runs, figures)


def default_task_tables() -> list[Table]:
    results = read("default_task.json")
    seeds = Table(
        "default task, 3 seeds (docs/results/default_task.json)",
        "| seed | positive before | positive after | score before | score after | KL after (nats) |",
    )
    for seed, run in results["defaults"].items():
        before, after = run["before"], run["after"]
        figures = [percent(before["eval/positive_rate"]), percent(after["eval/positive_rate"])]
        figures += [f"{before['eval/score']:.2f}", f"{after['eval/score']:.2f}", f"{after['eval/kl']:.1f}"]
        seeds.rows.append(([seed], figures))
    budget = Table(
        "default task, one token budget (docs/results/default_task.json)",
        "| algorithm | iterations | positive after | score after | eval KL (nats) | training time |",
        open_label=True,
    )
    for name, run in results["token budget"].items():
        after = run["after"]
        figures = [str(run["iterations"]), percent(after["eval/positive_rate"]), f"{after['eval/score']:.2f}"]
        figures += [f"{after['eval/kl']:.1f}", f"{run['training_seconds']:.0f} s"]
        budget.rows.append(([name], figures))
    return [seeds, budget]


def arithmetic_table() -> Table:
    recipes = read("recipes", "arithmetic.json")["runs"]
    sft = read("evaluate", "arithmetic-sft.json")
    runs = {algo: recipes[f"{algo.lower()} (default)"] for algo in ("GRPO", "PPO")}

    def figures(run: dict) -> list[str]:
        before_after = [f"{100 * sft['accuracy']:.1f}%", f"{100 * run['accuracy']:.1f}%"]
        return before_after + [f"{100 * sft['pass@4']:.1f}%", f"{100 * run['pass@4']:.1f}%", f"{run['kl']:.2f}"]

    header = "| algorithm | seed | accuracy before (SFT) | accuracy after | pass@4 before | pass@4 after "
    return algorithm_seed_table(
        "arithmetic (docs/results/recipes/arithmetic.json)", header + "| KL after (nats) |", runs, figures
    )


EVALUATIONS = ("reviews-sft", "reviews-ppo", "arithmetic-sft", "arithmetic-ppo")


def evaluation_table() -> Table:
    """`python -m agents.evaluate`'s figures, one column per JSON in docs/results/evaluate/."""
    results = {name: read("evaluate", f"{name}.json") for name in EVALUATIONS}

    def signed(x: float) -> str:
        return f"{x:+.2f}"

    def exact(d: dict, key: str) -> str:
        return percent(d[key]) if key in d else "-"

    cells: dict[str, Callable[[dict], str]] = {
        "mean score": lambda d: signed(d["score"]),
        "score std": lambda d: f"{d['score_std']:.2f}",
        "score 10% / 50% / 90%": lambda d: " / ".join(signed(d[f"score_q{q}"]) for q in (10, 50, 90)),
        "score > 0 rate (`positive_rate` / `score_gt0_rate`)": lambda d: percent(
            d.get("positive_rate", d.get("score_gt0_rate"))
        ),
        "accuracy (exact match)": lambda d: exact(d, "accuracy"),
        "pass@4": lambda d: exact(d, "pass@4"),
        # a model's KL to itself prints as 0.00, not -0.00
        "KL to the reference (nats per response)": lambda d: f"{abs(d['kl']) if abs(d['kl']) < 5e-3 else d['kl']:.2f}",
        "response length (tokens)": lambda d: f"{d['response_length']:.2f}",
        "EOS rate": lambda d: percent(d["eos_rate"]),
        "episodes (prompts x 4)": lambda d: f"{d['episodes']:.0f}",
    }
    header = "| | reviews, SFT | reviews, PPO | arithmetic, SFT | arithmetic, PPO |"  # EVALUATIONS' order
    table = Table("evaluation (docs/results/evaluate/)", header)
    table.rows = [([label], [cell(results[name]) for name in EVALUATIONS]) for label, cell in cells.items()]
    return table


def tables() -> list[Table]:
    return [pipeline_table(), calculator_table(), *default_task_tables(), arithmetic_table(), evaluation_table()]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def labelled(line: str, label: list[str], open_label: bool) -> bool:
    """Whether the table row ``line`` is the one ``label`` names."""
    have = cells(line)[: len(label)]
    if len(have) < len(label) or have[:-1] != label[:-1]:
        return False
    return have[-1].startswith(label[-1]) if open_label else have[-1] == label[-1]


def rewritten(lines: list[str], table: Table) -> list[tuple[int, str]]:
    """(index, the line as it must read) of each of ``table``'s rows in ``lines``; a table or row not found raises."""
    starts = [i for i, line in enumerate(lines) if line.strip() == table.header]
    if len(starts) != 1:
        raise LookupError(f"README.md has {len(starts)} tables headed {table.header!r} ({table.name}), not 1")
    body = []
    for line_number in range(starts[0] + 2, len(lines)):  # after the header and its --- row
        if not lines[line_number].startswith("|"):
            break
        body.append(line_number)
    out = []
    for label, figures in table.rows:
        found = [i for i in body if labelled(lines[i], label, table.open_label)]
        if len(found) != 1:
            raise LookupError(f"the {table.name} table has {len(found)} rows labelled {label}, not 1")
        kept = cells(lines[found[0]])[: len(label)]  # the README's own label (an open one says more)
        out.append((found[0], "| " + " | ".join(kept + figures) + " |"))
    return out


def write(readme: Path = README) -> int:
    """Rewrite ``readme``'s tables from the JSON, printing each row that changed; returns how many did."""
    lines = readme.read_text().split("\n")
    changed = 0
    for table in tables():
        for index, line in rewritten(lines, table):
            if lines[index] != line:
                print(f"{table.name}:\n  - {lines[index]}\n  + {line}")
                lines[index], changed = line, changed + 1
    readme.write_text("\n".join(lines))
    return changed


def main() -> None:
    print(f"{write()} rows of README.md rewritten")


if __name__ == "__main__":
    main()
