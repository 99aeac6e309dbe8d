"""The embedded tasks: what ``task=`` names, each shipped with the package and loaded offline.

- ``reviews`` (the default): continue a movie-review opening; a reward model trained on
  preference pairs pays positive sentiment (``textenv.default_task``).
- ``arithmetic``: answer ``17+25=`` with the digits and EOS; the reward function
  ``exact_match`` pays 1 for the right answer, 0 otherwise (``textenv.arithmetic``).
- ``calculator``: the same problems, in episodes of several turns: the agent may call
  a calculator (``?<eos>``), which appends the result, before it answers; the reward
  function ``final_answer`` pays the right answer (``textenv.calculator``).

A task gives the defaults of the config fields left unset: the policy (and
reference model), the reward model or reward functions, and the prompts of each
split with their data rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TaskName = Literal["reviews", "arithmetic", "calculator"]
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class EmbeddedTask:
    """An embedded task's models, reward and data."""

    name: str
    policy_dir: Path
    reward_model_dir: Path | None
    rows: Callable[[str], list[dict]]  # split -> rows, each {"prompt": ..., other columns}
    reward_fns: dict[str, Callable] = field(default_factory=dict)
    accuracy: str | None = None  # the reward function that says whether an answer is right (pass@k), if any
    interaction: Callable[[], object] | None = None  # builds the task's interaction, for tasks of several turns

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
    )


TASKS: dict[str, Callable[[], EmbeddedTask]] = {
    "reviews": _reviews,
    "arithmetic": _arithmetic,
    "calculator": _calculator,
}


def get_task(name: str) -> EmbeddedTask:
    """The embedded task ``name``; an unknown name raises, listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()
