"""Before and after RL on a TextArena game: Guess The Number, from an SFT policy that half bisects, half guesses.

    python examples/textarena/run.py --out runs/textarena [--summary docs/results/textarena/summary.json]

runs, each as its own command (from this folder, so that ``--interaction guess_the_number:GuessTheNumber``
imports the game):

    1. demonstrations.jsonl: 2,000 games, half played by bisecting, half by guessing at random, one row per
       guess (``guess_the_number.demonstrations``), and the games' prompt rows: 1,000 for training
       (seeds 0-999), 200 held out (seeds 1000-1199); the demonstrations' games are other seeds
    2. python -m agents.sft --data demonstrations.jsonl --model scratch --tokenizer-kind characters ...
    3. python -m agents.evaluate --prompts eval.jsonl --interaction ... --policy SFT/final   the SFT policy
    4. python -m agents --prompts train.jsonl --interaction ... --algo grpo|ppo --seed 0|1|2
    5. python -m agents.evaluate ... --policy RUN/final                                      each RL policy

Each evaluation plays each held-out game twice (400 games). The game pays 1 for the number found in
at most 5 wrong guesses and, for a game lost, a share that grows as the last guess nears the number;
``reward/interaction`` in the evaluation is that mean. The summary (OUT/summary.json, and ``--summary``)
holds each policy's mean reward and its number of guesses, every step's wall time and command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from guess_the_number import GuessTheNumber, demonstrations

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: steps.py
from steps import run_steps, write_summary  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS, ALGOS = (0, 1, 2), ("grpo", "ppo")
TRAIN_GAMES, EVAL_GAMES, DEMONSTRATION_GAMES = range(0, 1000), range(1000, 1200), range(100_000, 102_000)
GAME = ["--interaction", "guess_the_number:GuessTheNumber", "--reward-fn", "textenv.adapters:no_score"]
# a guess is its own turn, ended by "]" ("[12]": 4 characters); an invalid guess gets a reply of about 200
GAME += ["--end-of-turn-token", "]", "--max-prompt-tokens", "520", "--max-new-tokens", "5", "--max-turns", "6"]
GAME += ["--max-env-tokens", "240"]
ITERATIONS = 20
RL = ["--batch-size", "32", "--kl-coef", "0.02", "--no-adaptive-kl"]


def write_data(out: Path) -> str:
    """The demonstrations and the prompt rows as JSON lines; returns the calls that wrote them."""
    out.mkdir(parents=True, exist_ok=True)
    game = GuessTheNumber()
    files = {
        "demonstrations.jsonl": demonstrations(DEMONSTRATION_GAMES),
        "train.jsonl": game.rows(TRAIN_GAMES),
        "eval.jsonl": game.rows(EVAL_GAMES),
    }
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return (
        f"guess_the_number.demonstrations({DEMONSTRATION_GAMES}); GuessTheNumber().rows({TRAIN_GAMES}), ({EVAL_GAMES})"
    )


def steps(out: Path, k: int) -> dict[str, list[str]]:
    """Each step's command line (after ``python -m``), in order."""
    sft = out / "sft"
    evaluate = ["agents.evaluate", *GAME, "--prompts", f"{out}/eval.jsonl", "--reference-model", f"{sft}/final"]
    evaluate += ["--k", str(k)]
    commands = {
        "sft": ["agents.sft", "--data", f"{out}/demonstrations.jsonl", "--run-dir", str(sft), "--model", "scratch"]
        + ["--tokenizer-kind", "characters", "--layers", "2", "--width", "64", "--heads", "4", "--positions", "1792"]
        + ["--steps", "400", "--batch-size", "16", "--learning-rate", "3e-3", "--eval-every", "100", "--no-progress"],
        "evaluate_sft": [*evaluate, "--policy", f"{sft}/final", "--json", f"{out}/eval_sft.json"],
    }
    for algo in ALGOS:
        for seed in SEEDS:
            run = out / f"{algo}-{seed}"
            commands[f"{algo}-{seed}"] = ["agents", *GAME, "--prompts", f"{out}/train.jsonl", "--eval-prompts"]
            commands[f"{algo}-{seed}"] += [f"{out}/eval.jsonl", "--policy", f"{sft}/final", "--algo", algo]
            commands[f"{algo}-{seed}"] += ["--seed", str(seed), "--iterations", str(ITERATIONS), *RL, "--run-dir"]
            commands[f"{algo}-{seed}"] += [str(run), "--eval-every", str(ITERATIONS), "--no-progress"]
            commands[f"{algo}-{seed}"] += ["--checkpoint-every", str(ITERATIONS)]
            commands[f"evaluate_{algo}-{seed}"] = [*evaluate, "--policy", f"{run}/final"]
            commands[f"evaluate_{algo}-{seed}"] += ["--json", f"{out}/eval_{algo}-{seed}.json"]
    return commands


def figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    return {"reward": result["reward/interaction"]} | {key: result[key] for key in ("replies", "kl", "episodes")}


def summary(out: Path, seconds: dict[str, float], commands: dict, k: int) -> dict:
    runs = {
        algo: [
            {"seed": seed, "seconds": seconds[f"{algo}-{seed}"]} | figures(out / f"eval_{algo}-{seed}.json")
            for seed in SEEDS
        ]
        for algo in ALGOS
    }
    return {
        "game": "GuessTheNumber-v0 (1 to 20, 5 turns)",
        "k": k,
        "sft": {"seconds": seconds["sft"]} | figures(out / "eval_sft.json"),
        **runs,
        "seconds": seconds,
        "commands": commands,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the runs go (a new directory)")
    parser.add_argument("--k", type=int, default=2, help="plays of each held-out game")
    parser.add_argument("--summary", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.perf_counter()
    written = write_data(out)
    took = time.perf_counter() - start
    seconds, commands, digest = run_steps(steps(out, args.k), out, cwd=HERE)
    seconds, commands = {"data": took} | seconds, {"data": written} | commands
    write_summary(summary(out, seconds, commands, args.k) | {"source_sha256": digest}, out, args.summary)


if __name__ == "__main__":
    main()
