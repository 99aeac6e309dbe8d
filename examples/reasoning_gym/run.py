"""Before and after RL on a reasoning-gym task, from the command line: SFT from scratch, then GRPO and PPO.

    python examples/reasoning_gym/run.py --task basic_arithmetic --out runs/rg-basic_arithmetic \\
        [--summary docs/results/reasoning_gym/basic_arithmetic.json]

runs, each as its own command:

    1. the task's SFT demonstrations (``textenv.adapters.reasoning_gym.sft_rows``: questions and
       answers that are neither train nor eval questions) to demonstrations.jsonl
    2. python -m agents.sft --data demonstrations.jsonl --model scratch --tokenizer-kind characters ...
    3. python -m agents.evaluate --task reasoning_gym:... --policy SFT/final ...   the SFT policy
    4. python -m agents --task reasoning_gym:... --policy SFT/final --algo grpo|ppo --seed 0|1|2
    5. python -m agents.evaluate ... --policy RUN/final                             each RL policy

and writes a summary: the SFT policy's accuracy on the task's eval split (its 200 questions,
``--k`` samples each at temperature 1), each RL run's accuracy after training, each step's
wall time, every command (the output directory written as OUT), and the SHA-256 of the
library's sources (agents/ and textenv/), which must be the same when the run ends. Step 1
runs in this process (its command is recorded as the Python call it makes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from textenv.adapters.reasoning_gym import sft_rows, task_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: steps.py
from steps import run_steps, write_summary  # noqa: E402

SEEDS = (0, 1, 2)
ALGOS = ("grpo", "ppo")


@dataclass(frozen=True)
class Preset:
    """One task: its reasoning-gym config, the model's size, and how long each step trains."""

    config: dict
    sft_rows: int
    sft_steps: int
    max_prompt_tokens: int
    max_new_tokens: int
    iterations: int
    width: int = 128
    positions: int = 128
    rl: tuple[str, ...] = ("--learning-rate", "1e-4", "--kl-coef", "0.1", "--no-adaptive-kl")
    """The RL runs' settings past the defaults (the same for GRPO and PPO)."""


PRESETS = {
    # "Calculate 28 + 92." -> "120": the sum of two numbers of two digits (the generator writes one with one or
    # three at times); min_digits=2 keeps the splits alike, where min_digits=1 would put most of the few questions
    # of one-digit terms in the train split, and the eval split and the demonstrations would have almost none
    "basic_arithmetic": Preset(
        config=dict(
            min_terms=2,
            max_terms=2,
            min_digits=2,
            max_digits=2,
            operators=["+"],
            allow_parentheses=False,
            allow_negation=False,
        ),
        sft_rows=20000,
        sft_steps=1600,
        max_prompt_tokens=24,
        max_new_tokens=8,
        iterations=40,
    ),
    # "Spell this word backward (example: sun -> nus): Hakea" -> "aekaH": words of 3 to 7 letters; the score
    # gives partial credit (the share of the answer's letters right in place, 0.8 at most for a wrong answer)
    "spell_backward": Preset(
        config=dict(min_word_len=3, max_word_len=7),
        sft_rows=20000,
        sft_steps=1000,
        max_prompt_tokens=64,
        max_new_tokens=12,
        iterations=40,
    ),
}


def steps(name: str, preset: Preset, out: Path, k: int) -> dict[str, list[str]]:
    """Each step's command line (after ``python -m``), in order."""
    task = task_name(name, **preset.config)
    sft = out / "sft"
    limits = ["--max-prompt-tokens", str(preset.max_prompt_tokens), "--max-new-tokens", str(preset.max_new_tokens)]
    evaluate = ["agents.evaluate", "--task", task, *limits, "--reference-model", f"{sft}/final", "--k", str(k)]
    commands = {
        "sft": ["agents.sft", "--data", str(out / "demonstrations.jsonl"), "--run-dir", str(sft)]
        + ["--model", "scratch", "--tokenizer-kind", "characters", "--layers", "2", "--width", str(preset.width)]
        + ["--heads", "4", "--positions", str(preset.positions), "--steps", str(preset.sft_steps)]
        + ["--learning-rate", "2e-3", "--eval-every", str(preset.sft_steps // 4), "--no-progress"],
        "evaluate_sft": [*evaluate, "--policy", f"{sft}/final", "--json", str(out / "eval_sft.json")],
    }
    for algo in ALGOS:
        for seed in SEEDS:
            run = out / f"{algo}-{seed}"
            commands[f"{algo}-{seed}"] = ["agents", "--task", task, *limits, "--policy", f"{sft}/final"]
            commands[f"{algo}-{seed}"] += ["--algo", algo, "--seed", str(seed), "--iterations", str(preset.iterations)]
            commands[f"{algo}-{seed}"] += [*preset.rl, "--eval-every", str(preset.iterations), "--checkpoint-every"]
            commands[f"{algo}-{seed}"] += [str(preset.iterations), "--run-dir", str(run), "--no-progress"]
            commands[f"evaluate_{algo}-{seed}"] = [*evaluate, "--policy", f"{run}/final"]
            commands[f"evaluate_{algo}-{seed}"] += ["--json", str(out / f"eval_{algo}-{seed}.json")]
    return commands


def write_demonstrations(name: str, preset: Preset, path: Path) -> str:
    """The SFT rows as prompt/response JSON lines; returns the call that wrote them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    task = task_name(name, **preset.config)
    rows = sft_rows(task, preset.sft_rows)
    with path.open("w") as file:
        for row in rows:
            file.write(json.dumps({"prompt": row["prompt"], "response": row["answer"]}) + "\n")
    return f"textenv.adapters.reasoning_gym.sft_rows({task!r}, {preset.sft_rows})"


def figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {key: result[key] for key in ("accuracy", "pass@k", "kl", "response_length", "eos_rate", "episodes")}


def summary(name: str, preset: Preset, out: Path, seconds: dict[str, float], commands: dict, k: int) -> dict:
    runs = {}
    for algo in ALGOS:
        runs[algo] = [
            {"seed": seed, "seconds": seconds[f"{algo}-{seed}"]} | figures(out / f"eval_{algo}-{seed}.json")
            for seed in SEEDS
        ]
    sft_metrics = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines() if line]
    sft_eval = [row for row in sft_metrics if "eval/loss" in row]
    return {
        "task": task_name(name, **preset.config),
        "dataset": name,
        "k": k,
        "sft": {"seconds": seconds["sft"], "demonstrations": preset.sft_rows, "steps": preset.sft_steps}
        | {"eval_loss_after": sft_eval[-1]["eval/loss"]}
        | figures(out / "eval_sft.json"),
        **runs,
        "seconds": seconds,
        "commands": commands,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(PRESETS), required=True, help="the reasoning-gym dataset")
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (a new directory)")
    parser.add_argument("--k", type=int, default=4, help="samples per eval question")
    parser.add_argument("--summary", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    preset = PRESETS[args.task]
    start = time.perf_counter()
    written = write_demonstrations(args.task, preset, args.out / "demonstrations.jsonl")
    took = time.perf_counter() - start
    seconds, commands, digest = run_steps(steps(args.task, preset, args.out, args.k), args.out)
    seconds, commands = {"demonstrations": took} | seconds, {"demonstrations": written} | commands
    result = summary(args.task, preset, args.out, seconds, commands, args.k) | {"source_sha256": digest}
    write_summary(result, args.out, args.summary)


if __name__ == "__main__":
    main()
