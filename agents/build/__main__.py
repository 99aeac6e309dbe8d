"""Build an embedded task from nothing into OUT, then print its report: ``reviews``, ``arithmetic``, ``calculator``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import tyro
from transformers.utils import logging as hf_logging

from agents.build import arithmetic, calculator, reviews
from textenv.arithmetic.report import format_report as arithmetic_report
from textenv.calculator.report import format_report as calculator_report
from textenv.default_task.report import format_report as reviews_report

Omit = tyro.conf.OmitArgPrefixes
REVIEWS, ARITHMETIC, CALCULATOR = reviews.BuildConfig(), arithmetic.BuildConfig(), calculator.BuildConfig()


def timed(build, report, config, out: Path, threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    print(report(build(config, out)))
    print(f"\nwrote {out} in {time.perf_counter() - start:.0f} s")


def build_reviews(out: Path, config: Annotated[reviews.BuildConfig, Omit] = REVIEWS) -> None:
    """The review task: corpus, BPE tokenizer, SFT policy, reward model, prompts.

    Args:
        out: Directory to write (created if missing; existing files are overwritten).
        config: Sizes, steps and seed of the build.
    """
    timed(reviews.build, reviews_report, config, out, threads=None)


def build_arithmetic(out: Path, config: Annotated[arithmetic.BuildConfig, Omit] = ARITHMETIC) -> None:
    """The arithmetic task: problems, character tokenizer, SFT policy (one torch thread: the same build anywhere).

    Args:
        out: Directory to write (created if missing; existing files are overwritten).
        config: Sizes, steps and seed of the build.
    """
    timed(arithmetic.build, arithmetic_report, config, out, threads=1)


def build_calculator(out: Path, config: Annotated[calculator.BuildConfig, Omit] = CALCULATOR) -> None:
    """The calculator task: tokenizer and SFT policy of the tool-using agent (one torch thread).

    Args:
        out: Directory to write (created if missing; existing files are overwritten).
        config: Corpus, sizes, steps and seed of the build.
    """
    timed(calculator.build, calculator_report, config, out, threads=1)


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()  # one bar per saved or loaded tiny model is noise
    commands = {"reviews": build_reviews, "arithmetic": build_arithmetic, "calculator": build_calculator}
    tyro.extras.subcommand_cli_from_dict(commands, description=__doc__, args=argv)


if __name__ == "__main__":
    main()
