"""Command line of the calculator task: its episode ``report`` (``python -m agents.build calculator`` builds it)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textenv.calculator import ARTIFACTS_DIR, load_rows
from textenv.calculator.report import calculator_report, format_report
from textenv.tasks import print_report, report_command


def report(task_dir: Path = ARTIFACTS_DIR, samples: int = 1000, seed: int = 0, json_out: Path | None = None) -> None:
    """Print the episode report of a built task's policy on the eval problems (by default the shipped task).

    Args:
        task_dir: A directory written by ``build``.
        samples: Episodes at temperature 1, cycling over the eval prompts.
        seed: Seed of the sampling.
        json_out: Also write the report as JSON to this file.
    """
    policy_dir = Path(task_dir) / "policy"
    if not policy_dir.is_dir():
        raise SystemExit(
            f"error: {task_dir} is not a built task (no policy/); build one with `python -m agents.build calculator`"
        )
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    result = calculator_report(policy, tokenizer, load_rows("eval"), samples, seed)
    print_report(result, format_report(result), json_out)


def main(argv: list[str] | None = None) -> None:
    report_command(report, __doc__, argv)


if __name__ == "__main__":
    main()
