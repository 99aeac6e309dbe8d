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
imported as Python code: name only modules you trust, as with any script). A name
is checked before anything is imported (``check_code_name``): a module of Python's
standard library (``os:system``, ``builtins:eval``) is refused, and so is one that
lies in a folder the caller does not trust (the trainer's run directory). After the
import, a built-in or standard-library callable is refused too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        index = torch.as_tensor(rows, device=device)
        for fn in reward_fns:  # each its own copies: a function that edits its arguments changes nothing else
            ids = [list(slots.responses[r]) for r in rows]
            data = [slots.row(r) for r in rows]
            found = fn(prompts, responses, ids, data)
            values[fn.name][index] = torch.as_tensor(found, dtype=torch.float32, device=device)
    return values


def weighted_sum(reward_fns: Sequence[RewardFunction], values: dict[str, Tensor]) -> Tensor:
    """sum_i weight_i * f_i over the functions (0 where a function has no value), float32.

    Computed in float64: a weighted value or a sum beyond float32's range raises, naming the function (a reward
    of inf, or of float32's largest number, would otherwise be paid while ``info`` shows the raw value)."""
    total = None
    for fn in reward_fns:
        term = fn.weight * torch.nan_to_num(values[fn.name]).double()
        check_in_float32(term, f"reward function {fn.name!r} times its weight {fn.weight:g}", values[fn.name])
        total = term if total is None else total + term
    if total is None:
        return 0
    names = ", ".join(repr(fn.name) for fn in reward_fns)
    check_in_float32(total, f"the weighted sum of the reward functions {names}", None)
    return total.float()


def check_in_float32(values: Tensor, what: str, raw: Tensor | None) -> None:
    """Raise if any of ``values`` (float64) lies beyond float32's range, naming ``what`` and the slot."""
    beyond = values.abs() > FLOAT32_MAX
    if beyond.any():
        slot = int(beyond.nonzero()[0, 0])
        shown = "" if raw is None else f" (raw value {float(raw[slot]):g})"
        raise ValueError(
            f"{what} is {float(values[slot]):g} for slot {slot}{shown}, beyond float32's range (|reward| <= "
            f"{FLOAT32_MAX:.4g}) where rewards are computed; lower the weight or the function's values"
        )


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


FLOAT32_MAX = float(np.finfo(np.float32).max)  # rewards are float32 on the device: about 3.4e38


def fits_float32(value: numbers.Real) -> bool:
    """Whether a real number is finite and within float32's range (an int too large for a float is not)."""
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and abs(number) <= FLOAT32_MAX


def describe_number(value) -> str:
    """A number for an error message; an int too large to print whole as its magnitude."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)) > 10**18:
        digits = int(int(abs(value)).bit_length() * math.log10(2))
        return f"{'-' if value < 0 else ''}an integer of about 10**{digits}"
    return repr(value) if not isinstance(value, float) else str(value)


def check_value(name: str, value, where: str) -> float:
    """A reward function's value as a float; a non-number, NaN, infinity or a number beyond float32's range
    (about 3.4e38, where rewards are computed) raises, naming the function."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"reward function {name!r} returned {value!r} (a {type(value).__name__}) for {where}; it must return "
            "a number (float)"
        )
    if not fits_float32(value):
        raise ValueError(
            f"reward function {name!r} returned {describe_number(value)} for {where}; a reward must be finite and "
            f"within float32's range (|value| <= {FLOAT32_MAX:.4g})"
        )
    return float(value)


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it, the cause is its own exception."""


class RefusedCodeError(ValueError):
    """A ``module:function`` name that is not imported: standard library, built-in, or in an untrusted folder."""


def import_reward_fn(spec: str, what: str = "reward function", untrusted_dirs: Sequence[Path] = ()) -> Callable:
    """The callable ``module:function`` names (``module.sub:Class.method`` works too).

    The name is checked before anything is imported (``check_code_name``: no standard
    library, nothing under ``untrusted_dirs``), the callable after (no built-in or
    standard-library function re-exported under another module's name).
    """
    module_name, attribute = check_code_name(spec, what, untrusted_dirs)
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
    origin = defining_module(target)
    if inspect.isbuiltin(target) or is_standard_library(origin):
        raise RefusedCodeError(
            f"{what} {spec!r} is {'a built-in' if inspect.isbuiltin(target) else 'a standard-library'} callable "
            f"({origin}), not one of yours; pass module:function of a module you wrote"
        )
    return target


def check_code_name(spec: str, what: str = "reward function", untrusted_dirs: Sequence[Path] = ()) -> tuple[str, str]:
    """``(module, attribute)`` of a ``module:function`` name, checked without importing or running anything.

    Refused (``RefusedCodeError``, naming ``what`` and the name): a module of Python's
    standard library or a built-in module, and a module that would be imported from
    inside one of ``untrusted_dirs``: its file (or a parent package's) lies there, or its
    dotted path is the folder's own from an entry of ``sys.path``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"{what} must be module:function text, got {type(spec).__name__}")
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} must be written module:function, e.g. my_rewards:exact_match")
    if is_standard_library(module_name):
        raise RefusedCodeError(
            f"{what} {spec!r} names Python's standard library (module {module_name.partition('.')[0]!r}), not a "
            f"{what} of yours; pass module:function of a module you wrote"
        )
    for folder in untrusted_dirs:
        folder = Path(folder).expanduser().resolve()
        inside = [p for p in module_locations(module_name) if p == folder or folder in p.parents]
        dotted = [d for d in dotted_paths(folder) if module_name == d or module_name.startswith(d + ".")]
        if inside or dotted:
            where = f"found at {inside[-1]}" if inside else f"its module path starts with {dotted[0]!r}"
            raise RefusedCodeError(
                f"{what} {spec!r} would be imported from inside {folder} ({where}); code is never imported from "
                "there (anything that can write a run's files could plant it): move the module out of that folder"
            )
    return module_name, attribute


def is_standard_library(module_name: str) -> bool:
    """Whether ``module_name`` (dotted or not) belongs to Python's standard library or is a built-in module."""
    top = module_name.partition(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def defining_module(target) -> str:
    """The module that defines a callable (a ``functools.partial``'s function; an object's class)."""
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.isroutine(target) or inspect.isclass(target):
        return getattr(target, "__module__", None) or "builtins"
    return type(target).__module__


def module_locations(module_name: str) -> list[Path]:
    """The files and folders ``import module_name`` would run or search, its parent packages' included, found
    without running any module: ``find_spec`` of a top-level name runs nothing, and deeper names are looked up in
    their parent's folders as the import system's path finder would (``FileFinder``). A module already imported
    answers with its own ``__file__`` and ``__path__``."""
    parts, found, search = module_name.split("."), [], []
    for depth in range(len(parts)):
        name = ".".join(parts[: depth + 1])
        module = sys.modules.get(name)
        if module is not None:
            search = [str(p) for p in getattr(module, "__path__", None) or []]
            locations = [getattr(module, "__file__", None), *search]
        elif depth == 0:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                break  # not found: the import itself will say so
            search = [str(p) for p in spec.submodule_search_locations or []]
            locations = [spec.origin if spec.has_location else None, *search]
        else:
            locations, search = find_in_folders(name, search)
            if not locations:
                break
        found += [Path(p).resolve() for p in locations if isinstance(p, str) and p]
    return found


FILE_LOADERS = (
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


def find_in_folders(name: str, folders: list[str]) -> tuple[list[str], list[str]]:
    """``(locations, folders to search below it)`` of the submodule ``name`` in its parent's ``folders``: the
    first module or regular package found, else every namespace portion (as the path finder resolves them)."""
    portions = []
    for folder in folders:
        spec = importlib.machinery.FileFinder(folder, *FILE_LOADERS).find_spec(name)
        if spec is None:
            continue
        below = [str(p) for p in spec.submodule_search_locations or []]
        if spec.loader is not None:
            return [spec.origin, *below], below
        portions += below
    return portions, portions


def dotted_paths(folder: Path) -> list[str]:
    """The module paths that name ``folder`` from the entries of ``sys.path`` ('' is the working folder)."""
    paths = []
    for entry in sys.path:
        try:
            relative = Path(folder).resolve().relative_to(Path(entry or os.getcwd()).resolve())
        except (ValueError, OSError):
            continue
        if relative.parts and all(part.isidentifier() for part in relative.parts):
            paths.append(".".join(relative.parts))
    return paths


def import_from_working_directory() -> None:
    """Put the working folder first on ``sys.path``, as ``python -m`` does, so that a console script
    (``textenv-train``) imports ``--reward-fn mod:f`` from ``mod.py`` in the working folder too."""
    cwd = os.getcwd()
    if not any(Path(entry or cwd).resolve() == Path(cwd).resolve() for entry in sys.path if isinstance(entry, str)):
        sys.path.insert(0, cwd)


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
        if isinstance(weight, np.generic):
            weight = weight.item()
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not fits_float32(weight):
            raise ValueError(
                f"the weight of reward function {name!r} must be a finite number within float32's range "
                f"(|weight| <= {FLOAT32_MAX:.4g}), got {describe_number(weight)}"
            )
    return [RewardFunction(name, fn, float(w)) for (name, fn), w in zip(named, weights)]


def function_name(fn: Callable) -> str:
    """A function's name; a ``functools.partial`` or callable object is named by what it wraps or its class."""
    inner = getattr(fn, "func", fn)
    return getattr(inner, "__name__", type(inner).__name__)


MEMORY_ADDRESS = re.compile(r"\bat 0x[0-9a-fA-F]+")


def describe(value) -> str:
    """How a config file records a function: ``module:qualname`` (stable across runs, unlike its repr); a
    ``functools.partial`` as ``functools.partial(module:qualname, its arguments)``; an interaction object by its
    class. What has no such name (a callable object, an argument whose repr is an address) comes out as its repr,
    which holds a memory address: ``unstable_description`` says so, and the trainer refuses it at start."""
    if isinstance(value, functools.partial):
        arguments = [describe(value.func), *map(repr, value.args), *(f"{k}={v!r}" for k, v in value.keywords.items())]
        return f"functools.partial({', '.join(arguments)})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{value.__module__}:{value.__qualname__}"
    if callable(getattr(value, "respond", None)):  # an interaction: its class, built again on --resume
        return f"{type(value).__module__}:{type(value).__qualname__}"
    return str(value)


def unstable_description(value) -> str | None:
    """``describe(value)`` when it holds a memory address (it would name nothing in another process), else None."""
    text = describe(value)
    return text if MEMORY_ADDRESS.search(text) else None
