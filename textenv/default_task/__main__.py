"""Command line of the default task: print its quality ``report`` (``python -m agents.build reviews`` builds it)."""

from __future__ import annotations

import json
from pathlib import Path

import tyro
from transformers.utils import logging as hf_logging

from textenv.default_task import ARTIFACTS_DIR
from textenv.default_task.report import format_report, quality_report


def report(
    task_dir: Path = ARTIFACTS_DIR,
    n_samples: int = 512,
    max_new_tokens: int = 32,
    seed: int = 0,
    json_out: Path | None = None,
) -> None:
    """Print the quality report of a built task (by default the one shipped with textenv).

    Args:
        task_dir: A directory written by ``build``.
        n_samples: Policy samples to draw, cycling over the eval prompts.
        max_new_tokens: Longest response sampled.
        seed: Seed of the sampling.
        json_out: Also write the report as JSON to this file.
    """
    if not (Path(task_dir) / "task.json").is_file():
        raise SystemExit(
            f"error: {task_dir} is not a built task (no task.json); build one with `python -m agents.build reviews`"
        )
    result = quality_report(task_dir, n_samples=n_samples, max_new_tokens=max_new_tokens, seed=seed)
    print(format_report(result))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()  # one bar per saved or loaded tiny model is noise
    tyro.extras.subcommand_cli_from_dict({"report": report}, description=__doc__, args=argv)


if __name__ == "__main__":
    main()
