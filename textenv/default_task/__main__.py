"""Command line of the default task: print its quality ``report`` (``python -m agents.build reviews`` builds it)."""

from __future__ import annotations

from pathlib import Path

from textenv.default_task import ARTIFACTS_DIR
from textenv.default_task.report import format_report, quality_report
from textenv.tasks import print_report, report_command


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
    print_report(result, format_report(result), json_out)


def main(argv: list[str] | None = None) -> None:
    report_command(report, __doc__, argv)


if __name__ == "__main__":
    main()
