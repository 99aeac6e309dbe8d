"""The three steps of RLHF on the example's data, from the command line, with the figures of each.

    python examples/pipeline/run.py --out runs/pipeline [--summary docs/results/pipeline/summary.json]

runs, each as its own command (the README's "Your own data" section shows them):

    1. python -m agents.sft --data demonstrations.jsonl ...        the SFT policy from scratch
    2. python -m agents.reward_model --data preferences.jsonl ...  the reward model, from the SFT policy
    3. python -m agents --policy ... --reward-model ...             PPO on the complaints of prompts_train.txt
    then python -m agents.evaluate on prompts_eval.txt, for the SFT policy and the PPO policy

and writes a summary: held-out SFT loss before and after, the reward model's held-out
pairwise accuracy and its calibration, the evaluation before and after PPO, and each
step's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: steps.py
from steps import run_steps, write_summary  # noqa: E402

HERE = Path(__file__).resolve().parent


def steps(out: Path, data: Path) -> dict[str, list[str]]:
    """Each step's command line (after ``python -m``)."""
    sft, rm, ppo = out / "sft", out / "rm", out / "ppo"
    evaluate = ["agents.evaluate", "--reward-model", f"{rm}/final", "--reference-model", f"{sft}/final"]
    evaluate += ["--prompts", f"{data}/prompts_eval.txt", "--k", "8"]
    return {
        "sft": ["agents.sft", "--data", f"{data}/demonstrations.jsonl", "--run-dir", str(sft), "--layers", "2"]
        + ["--width", "64", "--positions", "64", "--steps", "600", "--learning-rate", "2e-3", "--no-progress"],
        "reward_model": ["agents.reward_model", "--data", f"{data}/preferences.jsonl", "--model", f"{sft}/final"]
        + ["--run-dir", str(rm), "--steps", "300", "--no-progress"],
        "ppo": ["agents", "--policy", f"{sft}/final", "--reward-model", f"{rm}/final"]
        + ["--prompts", f"{data}/prompts_train.txt", "--eval-prompts", f"{data}/prompts_eval.txt"]
        + ["--run-dir", str(ppo), "--no-progress"],
        "evaluate_sft": [*evaluate, "--policy", f"{sft}/final", "--json", str(out / "eval_sft.json")],
        "evaluate_ppo": [*evaluate, "--policy", f"{ppo}/final", "--json", str(out / "eval_ppo.json")],
    }


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(out: Path, seconds: dict[str, float]) -> dict:
    sft = [row for row in read_jsonl(out / "sft" / "metrics.jsonl") if "eval/loss" in row]
    rm = [row for row in read_jsonl(out / "rm" / "metrics.jsonl") if "eval/accuracy" in row]
    calibration = json.loads((out / "rm" / "calibration.json").read_text())
    before, after = (json.loads((out / f"eval_{name}.json").read_text()) for name in ("sft", "ppo"))
    keep = ("score", "score_gt0_rate", "kl", "response_length", "eos_rate")
    return {
        "sft": {"eval_loss_before": sft[0]["eval/loss"], "eval_loss_after": sft[-1]["eval/loss"]}
        | {"perplexity_after": sft[-1]["eval/perplexity"], "seconds": seconds["sft"]},
        "reward_model": {"accuracy_before": rm[0]["eval/accuracy"], "accuracy_after": rm[-1]["eval/accuracy"]}
        | {"calibration": calibration, "seconds": seconds["reward_model"]},
        "ppo": {"seconds": seconds["ppo"]},
        "evaluation": {"sft": {k: before[k] for k in keep}, "ppo": {k: after[k] for k in keep}}
        | {"episodes": after["episodes"], "seconds": seconds["evaluate_sft"] + seconds["evaluate_ppo"]},
        "total_seconds": sum(seconds.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="where the runs go (a new directory)")
    parser.add_argument("--data", type=Path, default=HERE, help="the example's data (make_data.py writes it)")
    parser.add_argument("--summary", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    seconds, commands, digest = run_steps(steps(args.out, args.data), args.out)
    result = summary(args.out, seconds) | {"commands": commands, "source_sha256": digest}
    write_summary(result, args.out, args.summary)


if __name__ == "__main__":
    main()
