"""Reward functions: plain Python callables that pay an episode, beside or instead of a reward model.

An episode's score is the weighted sum of its paying terms::

    score = reward_model(prompt + response) + sum_i weight_i * f_i(prompt, response, response_ids, row)

Each function is called with keyword arguments, once per finished episode::

    def exact_match(prompt: str, response: str, response_ids: list[int], row: dict) -> float:
        return float(response.strip() == row["answer"])

``prompt`` is the prompt's text (a conversation's rendered chat template),
``response`` the decoded response without special tokens, ``response_ids`` its
token ids (the EOS included when the episode ended with it) and ``row`` the
prompt's other data columns (``{}`` for plain prompts). A function that takes
``**kwargs`` may ignore what it does not need. It returns a real number (a bool
counts as 1.0 or 0.0); anything else, NaN, infinity or an exception is an error
that names the function.

A function marked ``@batched`` scores every episode that ended on one step in
one call, with lists (``prompts``, ``responses``, ``response_ids``, ``rows``),
and returns one number per episode.

A step reward function (``step_reward_fn``, process rewards) is called on every
step of every live episode with ``prompt``, ``response_ids`` (the response so
far, this step's token last) and ``row``; its value is added to that step's
reward, beside the KL penalty. Its sum over an episode plus the final score
and the KL terms is the episode's return.

On the command line a function is named ``module:function`` (the module is
imported as Python code: name only modules you trust, as with any script).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from textenv.slots import Slots

RewardFnLike = Callable | str
RewardFnsLike = Sequence[RewardFnLike] | Mapping[str, RewardFnLike] | Callable | str
REWARD_MODEL_TERM = "reward_model"  # the name of the reward model's term in ``info`` and the metrics


def batched(fn: Callable) -> Callable:
    """Mark ``fn`` as batched: it takes lists (prompts, responses, response_ids, rows) and returns a list."""
    fn.textenv_batched = True
    return fn


@dataclass(frozen=True)
class RewardFunction:
    """A reward function with its name (in ``info["reward/<name>"]`` and the metrics) and weight."""

    name: str
    fn: Callable
    weight: float = 1.0

    @property
    def batched(self) -> bool:
        return bool(getattr(self.fn, "textenv_batched", False))

    def __call__(
        self, prompts: list[str], responses: list[str], response_ids: list[list[int]], rows: list[dict]
    ) -> np.ndarray:
        """The function's raw values for a batch of finished episodes, (K,), each checked."""
        if self.batched:
            values = call(
                self.name, self.fn, prompts=prompts, responses=responses, response_ids=response_ids, rows=rows
            )
            if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
                raise TypeError(
                    f"batched reward function {self.name!r} returned {type(values).__name__}; it must return one "
                    f"number per episode (a list of {len(prompts)})"
                )
            if len(values) != len(prompts):
                raise ValueError(
                    f"batched reward function {self.name!r} returned {len(values)} values for {len(prompts)} episodes; "
                    "it must return one number per episode, in order"
                )
        else:
            values = [
                call(self.name, self.fn, prompt=p, response=r, response_ids=ids, row=row)
                for p, r, ids, row in zip(prompts, responses, response_ids, rows)
            ]
        return np.array([check_value(self.name, v, f"the response {r!r}") for v, r in zip(values, responses)])


@dataclass(frozen=True)
class StepRewardFunction:
    """A process reward: called on every step of every live episode with the response so far."""

    fn: Callable
    name: str = "step"

    def __call__(self, prompts: list[str], response_ids: list[list[int]], rows: list[dict]) -> np.ndarray:
        """This step's reward of each episode, (K,)."""
        values = [
            call(self.name, self.fn, prompt=p, response_ids=ids, row=row)
            for p, ids, row in zip(prompts, response_ids, rows)
        ]
        return np.array([check_value(self.name, v, f"the response ids {ids}") for v, ids in zip(values, response_ids)])


def function_terms(
    reward_fns: Sequence[RewardFunction], slots: Slots, rows: np.ndarray, responses: list[str], device
) -> dict[str, Tensor]:
    """Each function's raw value for the episodes ``rows`` that ended this step (NaN elsewhere), (N,) each.

    ``responses``: the ended episodes' response texts (``Slots.response_text``), in the order of ``rows``.
    """
    values = {fn.name: torch.full((slots.num_slots,), float("nan"), device=device) for fn in reward_fns}
    if len(rows):
        prompts = [slots.prompt_text(r) for r in rows]
        ids = [list(slots.responses[r]) for r in rows]
        data = [slots.row(r) for r in rows]
        index = torch.as_tensor(rows, device=device)
        for fn in reward_fns:
            found = fn(prompts, responses, ids, data)
            values[fn.name][index] = torch.as_tensor(found, dtype=torch.float32, device=device)
    return values


def weighted_sum(reward_fns: Sequence[RewardFunction], values: dict[str, Tensor]) -> Tensor:
    """sum_i weight_i * f_i over the functions (0 where a function has no value)."""
    return sum(fn.weight * torch.nan_to_num(values[fn.name]) for fn in reward_fns)


def step_rewards(step_fn: StepRewardFunction, slots: Slots, live: np.ndarray, device) -> Tensor:
    """The step reward function's value for each live slot's newest token (NaN elsewhere), (N,)."""
    rows = np.flatnonzero(live)
    values = torch.full((slots.num_slots,), float("nan"), device=device)
    if len(rows):
        prompts = [slots.prompt_text(r) for r in rows]
        found = step_fn(prompts, [list(slots.responses[r]) for r in rows], [slots.row(r) for r in rows])
        values[torch.as_tensor(rows, device=device)] = torch.as_tensor(found, dtype=torch.float32, device=device)
    return values


def call(name: str, fn: Callable, **arguments):
    """``fn(**arguments)``; an exception is re-raised as ``RewardFunctionError`` naming the function."""
    try:
        return fn(**arguments)
    except Exception as error:
        raise RewardFunctionError(
            f"reward function {name!r} raised {type(error).__name__}: {error}. It is called with the keyword "
            f"arguments {', '.join(arguments)} (declare **kwargs to ignore some)"
        ) from error


def check_value(name: str, value, where: str) -> float:
    """A reward function's value as a float; a non-number, NaN or infinity raises, naming the function."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"reward function {name!r} returned {value!r} (a {type(value).__name__}) for {where}; it must return "
            "a number (float)"
        )
    if not math.isfinite(value):
        raise ValueError(f"reward function {name!r} returned {value} for {where}; a reward must be finite")
    return float(value)


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it, the cause is its own exception."""


def import_reward_fn(spec: str, what: str = "reward function") -> Callable:
    """The callable ``module:function`` names (``module.sub:Class.method`` works too)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} must be written module:function, e.g. my_rewards:exact_match")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"{what} {spec!r}: cannot import module {module_name!r} ({error}); it must be importable from the "
            "working directory or the installed packages"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ImportError(f"{what} {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{what} {spec!r} is a {type(target).__name__}, not a callable")
    return target


def resolve_reward_fns(fns: RewardFnsLike | None, weights: Sequence[float] | None) -> list[RewardFunction]:
    """Named, weighted reward functions from a callable, a list, a ``{name: fn}`` dict or ``module:function`` text.

    ``weights``: one per function (default 1.0 each). Names must be distinct.
    """
    if fns is None:
        return []
    if callable(fns) or isinstance(fns, str):
        fns = [fns]
    if isinstance(fns, Mapping):
        named = [(name, import_reward_fn(fn) if isinstance(fn, str) else fn) for name, fn in fns.items()]
    else:
        named = []
        for fn in fns:
            fn = import_reward_fn(fn) if isinstance(fn, str) else fn
            named.append((function_name(fn), fn))
    for name, fn in named:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"reward function names must be non-empty text without '/', got {name!r}")
        if not callable(fn):
            raise TypeError(f"reward function {name!r} is a {type(fn).__name__}, not a callable")
    names = [name for name, _ in named]
    clash = sorted({name for name in names if names.count(name) > 1} | ({REWARD_MODEL_TERM} & set(names)))
    if clash:
        raise ValueError(
            f"reward function names must be distinct and not {REWARD_MODEL_TERM!r}; {clash} clash: pass a "
            "{name: function} dict to name them"
        )
    weights = [1.0] * len(named) if weights is None or len(weights) == 0 else list(weights)
    if len(weights) != len(named):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(named)} reward functions {names}")
    for name, weight in zip(names, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"the weight of reward function {name!r} must be a finite number, got {weight!r}")
    return [RewardFunction(name, fn, float(w)) for (name, fn), w in zip(named, weights)]


def function_name(fn: Callable) -> str:
    """A function's name; a ``functools.partial`` or callable object is named by what it wraps or its class."""
    inner = getattr(fn, "func", fn)
    return getattr(inner, "__name__", type(inner).__name__)


def describe(value) -> str:
    """How a config file records a function: ``module:qualname`` (stable across runs, unlike its repr)."""
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}:{value.__qualname__}"
    if callable(getattr(value, "respond", None)):  # an interaction: its class, built again on --resume
        return f"{type(value).__module__}:{type(value).__qualname__}"
    return str(value)
