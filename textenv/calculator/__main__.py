"""Command line of the calculator task: ``build`` its policy from scratch or print its episode ``report``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from textenv.calculator import ARTIFACTS_DIR, load_rows
from textenv.calculator.build import build as build_task
from textenv.calculator.data import BuildConfig
from textenv.calculator.report import calculator_report, format_report

DEFAULT_BUILD = BuildConfig()


def build(out: Path = ARTIFACTS_DIR, config: Annotated[BuildConfig, tyro.conf.OmitArgPrefixes] = DEFAULT_BUILD) -> None:
    """Build the tokenizer and SFT policy into OUT, then report on them.

    Args:
        out: Directory to write (created if missing; existing files are overwritten); by default the shipped artifacts.
        config: Corpus, sizes, steps and seed of the build.
    """
    torch.set_num_threads(1)  # the model is tiny: one thread is as fast, and the build is the same on any machine
    start = time.perf_counter()
    report = build_task(config, out)
    print(format_report(report))
    print(f"\nwrote {out} in {time.perf_counter() - start:.0f} s")


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
        raise SystemExit(f"error: {task_dir} is not a built task (no policy/); build one with `build --out {task_dir}`")
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    result = calculator_report(policy, tokenizer, load_rows("eval"), samples, seed)
    print(format_report(result))
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()  # one bar per saved or loaded tiny model is noise
    tyro.extras.subcommand_cli_from_dict({"build": build, "report": report}, description=__doc__, args=argv)


if __name__ == "__main__":
    main()
