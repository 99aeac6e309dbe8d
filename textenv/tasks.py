"""The embedded tasks: what ``task=`` names, each shipped with the package and loaded offline.

- ``reviews`` (the default): continue a movie-review opening; a reward model trained on
  preference pairs pays positive sentiment (``textenv.default_task``).
- ``arithmetic``: answer ``17+25=`` with the digits and EOS; the reward function
  ``exact_match`` pays 1 for the right answer, 0 otherwise (``textenv.arithmetic``).
- ``calculator``: the same problems, in episodes of several turns: the agent may call
  a calculator (``?<eos>``), which appends the result, before it answers; the reward
  function ``final_answer`` pays the right answer (``textenv.calculator``).

A task is a preset: it gives the config fields left unset their values (the
policy and reference model, the reward model or reward functions, the answer
check, the interaction, the episode limits) and the prompts of each split with
their data rows. ``textenv.config.resolve_config`` applies it, once, for the
envs, the trainer and the evaluator alike.
"""

from __future__ import annotations

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
    policy_dir: Path
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


def get_task(name: str) -> EmbeddedTask:
    """The embedded task ``name``; an unknown name raises, listing the tasks."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()
