"""The embedded tasks: what ``task=`` names, each shipped with the package and loaded offline.

- ``reviews`` (the default): continue a movie-review opening; a reward model trained on
  preference pairs pays positive sentiment (``textenv.default_task``).
- ``arithmetic``: answer ``17+25=`` with the digits and EOS; the reward function
  ``exact_match`` pays 1 for the right answer, 0 otherwise (``textenv.arithmetic``).
- ``calculator``: the same problems, in episodes of several turns: the agent may call
  a calculator (``?<eos>``), which appends the result, before it answers; the reward
  function ``final_answer`` pays the right answer (``textenv.calculator``).

Names with an adapter's prefix are tasks of an optional extra, loaded by its module
on first use: ``reasoning_gym:NAME`` poses a reasoning-gym generator's questions and
pays its ``score_answer`` (``textenv.adapters.reasoning_gym``). Such a task ships no
model: the user gives the policy, reference model and tokenizer.

A task is a preset: it gives the config fields left unset their values (the
policy and reference model, the reward model or reward functions, the answer
check, the interaction, the episode limits) and the prompts of each split with
their data rows. ``textenv.config.resolve_config`` applies it, once, for the
envs, the trainer and the evaluator alike.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

TaskName = Literal["reviews", "arithmetic", "calculator"]
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class EpisodeLimits:
    """A task's episode limits, the values of the config fields of the same names; the defaults are the base ones
    (the review task's)."""

    max_prompt_tokens: int = 16
    max_new_tokens: int = 32  # per agent turn
    max_turns: int = 4  # used with an interaction only
    max_env_tokens: int = 16  # used with an interaction only


LIMITS = tuple(f.name for f in fields(EpisodeLimits))


@dataclass(frozen=True)
class EmbeddedTask:
    """An embedded task: its models, reward, data and episode limits."""

    name: str
    policy_dir: Path | os.PathLike  # an adapter's task: a path-like that raises, naming the arguments to pass
    reward_model_dir: Path | None
    rows: Callable[[str], list[dict]]  # split -> rows, each {"prompt": ..., other columns}
    reward_fns: dict[str, Callable] = field(default_factory=dict)
    accuracy: str | None = None  # the reward function that says whether an answer is right (pass@k), if any
    interaction: type | None = None  # the class of the task's interaction, for tasks of several turns
    limits: EpisodeLimits = EpisodeLimits()

    def prompt_rows(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"the {self.name} task has the splits {SPLITS}, not {split!r}")
        return self.rows(split)


def _reviews() -> EmbeddedTask:
    from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts

    return EmbeddedTask(
        "reviews", POLICY_DIR, REWARD_MODEL_DIR, lambda split: [{"prompt": p} for p in load_prompts(split)]
    )


def _arithmetic() -> EmbeddedTask:
    from textenv import arithmetic

    return EmbeddedTask(
        "arithmetic",
        arithmetic.POLICY_DIR,
        None,
        arithmetic.load_rows,
        {"exact_match": arithmetic.exact_match},
        accuracy="exact_match",
        limits=EpisodeLimits(max_prompt_tokens=arithmetic.MAX_PROMPT_TOKENS, max_new_tokens=arithmetic.MAX_NEW_TOKENS),
    )


def _calculator() -> EmbeddedTask:
    from textenv import calculator

    return EmbeddedTask(
        "calculator",
        calculator.POLICY_DIR,
        None,
        calculator.load_rows,
        {"final_answer": calculator.final_answer},
        accuracy="final_answer",
        interaction=calculator.Calculator,
        limits=EpisodeLimits(
            calculator.MAX_PROMPT_TOKENS, calculator.MAX_NEW_TOKENS, calculator.MAX_TURNS, calculator.MAX_ENV_TOKENS
        ),
    )


TASKS: dict[str, Callable[[], EmbeddedTask]] = {
    "reviews": _reviews,
    "arithmetic": _arithmetic,
    "calculator": _calculator,
}


ADAPTER_TASKS = {"reasoning_gym:": "textenv.adapters.reasoning_gym"}
"""Task-name prefixes of the optional extras, and the module (imported on first use) whose ``task(name)`` and
``check_name(name)`` build and check such a task."""


def adapter_module(name: str):
    """The adapter module whose prefix ``name`` has, imported; None for any other name."""
    for prefix, module in ADAPTER_TASKS.items():
        if isinstance(name, str) and name.startswith(prefix):
            return importlib.import_module(module)
    return None


def check_task(name) -> None:
    """Raise unless ``name`` is an embedded task or an adapter's task name of valid form (its library unloaded)."""
    adapter = adapter_module(name)
    if adapter is not None:
        adapter.check_name(name)
    elif name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)} or 'reasoning_gym:NAME', got {name!r}")


def get_task(name: str) -> EmbeddedTask:
    """The embedded task ``name``, or an adapter's task; an unknown name raises, listing the tasks."""
    adapter = adapter_module(name)
    if adapter is not None:
        return adapter.task(name)
    check_task(name)
    return TASKS[name]()


def report_command(report: Callable[..., None], description: str, argv: list[str] | None) -> None:
    """A task's command line (``python -m textenv.<task> report``): its quality report; the learner side builds it
    (``python -m agents.build``)."""
    import tyro
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per loaded tiny model is noise
    tyro.extras.subcommand_cli_from_dict({"report": report}, description=description, args=argv)


def print_report(result: dict, text: str, json_out: Path | None) -> None:
    """Print a task report's ``text``; with ``json_out``, also write ``result`` there as JSON."""
    print(text)
    if json_out is not None:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
