"""reasoning-gym's procedural datasets as tasks: ``gym.make("TokenRLHF-v0", task="reasoning_gym:NAME", ...)``.

A task name is ``reasoning_gym:`` then one dataset name, or several joined by ``+`` (a
composite dataset that mixes them), then optionally ``?key=value&key=value``::

    reasoning_gym:chain_sum
    reasoning_gym:chain_sum?size=500&seed=3&min_terms=2&max_terms=3
    reasoning_gym:leg_counting+chain_sum?leg_counting.weight=2&chain_sum.max_digits=2

- ``size`` (train questions, default 1000), ``eval_size`` (default 200), ``seed``
  (default 0): the splits' generators, see below;
- ``answer_tag`` (e.g. ``answer``): score the text between ``<answer>`` and
  ``</answer>`` (reasoning-gym's ``extract_answer``; none found scores 0) instead of
  the whole response;
- any other key is a field of the dataset's config (its difficulty options); in a
  composite, ``NAME.key`` sets one dataset's field and ``NAME.weight`` its weight
  (default 1). Values are read as JSON where they parse (``2``, ``true``, ``[1, 3]``),
  else as text. ``task_name(...)`` writes such a name from Python arguments.

How reasoning-gym's concepts map onto the env:

- the entry's ``question`` is the prompt (a plain string: with a chat model pass
  ``chat_template=True`` and it is the one user message of the tokenizer's template);
- the entry's ``question``, ``answer`` and ``metadata`` are the prompt's data row
  (``info["row"]``, the reward function's ``row``);
- the dataset's own ``score_answer(response, entry)`` is the reward function
  ``score_answer``, partial credit kept as it gives it; it is also the accuracy term
  (evaluation's accuracy is its mean, pass@k counts a score above 0.5).

``sft_rows(name, size)`` gives questions with their answers for fine-tuning a policy
before RL, drawn past both splits and sharing no question with either.

Splits: reasoning-gym draws item ``i`` of a dataset of seed ``s`` from ``Random(s + i)``
(a composite's k-th dataset from ``Random(s + k + i)``), so two seeds that differ by less
than the train size would share items. The train split uses ``seed``, the eval split
``seed + size + number of datasets``, whose random streams all lie beyond the train
split's; and an eval question that is also a train question (a small generator repeats
itself) is skipped for the next one, so no eval question is ever a train question.

The task ships no model: pass ``reference_model=`` (and ``policy=``) and ``tokenizer=``
to the env, or ``--policy DIR`` to ``python -m agents``; without one the env raises,
saying so. ``import reasoning_gym`` imports every one of its task modules, so the extra
installs their dependencies too (``drawsvg``, ``six``); this module imports it only when
a task is built.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, fields
from functools import partial
from urllib.parse import parse_qsl, quote

from textenv.adapters import require
from textenv.tasks import EmbeddedTask, EpisodeLimits

PREFIX = "reasoning_gym:"
SIZE, EVAL_SIZE, SEED = 1000, 200, 0
RESERVED = ("size", "eval_size", "seed", "answer_tag")
LIMITS = EpisodeLimits(max_prompt_tokens=512, max_new_tokens=128)
"""Episode limits of every reasoning-gym task; set max_prompt_tokens and max_new_tokens to your tokenizer's needs."""
MAX_TRIES = 20  # eval items drawn per eval question wanted, at most, while skipping train questions


@dataclass(frozen=True)
class Spec:
    """A reasoning-gym task name, parsed (no library needed)."""

    name: str
    datasets: tuple[str, ...]
    options: tuple[tuple[str, object], ...]  # the dataset config fields (NAME.field in a composite)
    size: int = SIZE
    eval_size: int = EVAL_SIZE
    seed: int = SEED
    answer_tag: str | None = None

    def split_seed(self, split: str) -> int:
        """train: ``seed``; eval: past every train draw; sft: past every eval draw (at most eval_size x MAX_TRIES)."""
        eval_seed = self.seed + self.size + len(self.datasets)
        if split == "train":
            return self.seed
        return eval_seed if split == "eval" else eval_seed + self.eval_size * MAX_TRIES + len(self.datasets)


def parse(name: str) -> Spec:
    """The parts of a ``reasoning_gym:`` task name; a malformed one raises, saying the form."""
    form = "the form reasoning_gym:NAME[+NAME...][?key=value&...] (docs/adapters.md)"
    if not isinstance(name, str) or not name.startswith(PREFIX):
        raise ValueError(f"task {name!r} is not a reasoning-gym task name: use {form}")
    body, _, query = name[len(PREFIX) :].partition("?")
    datasets = tuple(body.split("+"))
    if not all(d.isidentifier() for d in datasets) or len(set(datasets)) != len(datasets):
        raise ValueError(f"task {name!r}: dataset names must be distinct identifiers joined by '+': use {form}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as error:
        raise ValueError(f"task {name!r}: the options after '?' must be key=value pairs joined by '&'") from error
    options, reserved = [], {}
    for key, text in pairs:
        if key in reserved or any(key == k for k, _ in options):
            raise ValueError(f"task {name!r} sets {key!r} twice")
        value = read_value(text)
        if key in RESERVED:
            reserved[key] = value
        else:
            options.append((key, value))
    spec = Spec(name, datasets, tuple(options), **reserved)
    check_reserved(spec)
    return spec


def read_value(text: str):
    """A value as JSON where it parses (``2``, ``true``, ``[1, 3]``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_reserved(spec: Spec) -> None:
    for key, minimum in (("size", 1), ("eval_size", 1), ("seed", 0)):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"task {spec.name!r}: {key} must be an int >= {minimum}, got {value!r}")
    if spec.answer_tag is not None and not (isinstance(spec.answer_tag, str) and spec.answer_tag.isidentifier()):
        raise ValueError(f"task {spec.name!r}: answer_tag must be a tag's name such as answer, got {spec.answer_tag!r}")


def check_name(name: str) -> None:
    """Raise unless ``name`` is a well-formed reasoning-gym task name (the library is not imported)."""
    parse(name)


def task_name(
    datasets: str | dict[str, dict],
    *,
    size: int | None = None,
    eval_size: int | None = None,
    seed: int | None = None,
    answer_tag: str | None = None,
    **config,
) -> str:
    """The task name of a dataset with ``config`` (its fields), or of a composite ``{name: {field: value,
    "weight": w}}``; ``task_name("chain_sum", size=500, max_terms=3)`` is ``reasoning_gym:chain_sum?size=500&...``."""
    if isinstance(datasets, str):
        names, options = [datasets], dict(config)
    else:
        if config:
            raise TypeError(f"a composite's fields go in its {{name: {{field: value}}}} dict, not {sorted(config)}")
        names = list(datasets)
        options = {f"{name}.{key}": value for name, fields_ in datasets.items() for key, value in fields_.items()}
    reserved = dict(size=size, eval_size=eval_size, seed=seed, answer_tag=answer_tag)
    options = {k: v for k, v in reserved.items() if v is not None} | options
    query = "&".join(f"{key}={quote(json.dumps(value), safe='')}" for key, value in options.items())  # "1" stays text
    name = PREFIX + "+".join(names) + (f"?{query}" if query else "")
    parse(name)
    return name


class MissingModel(os.PathLike):
    """The reference model of a task that ships none: reading it as a path raises, saying what to pass."""

    def __init__(self, task: str):
        self.task = task

    def __fspath__(self) -> str:
        raise ValueError(
            f"task {self.task!r} ships no model: pass reference_model= (a causal LM that can read its questions, "
            "e.g. one fine-tuned on them) and tokenizer= to the env, with policy= for the KL term, or --policy DIR "
            "to python -m agents"
        )

    def __repr__(self) -> str:
        return f"MissingModel({self.task!r})"


def dataset_configs(spec: Spec) -> dict[str, tuple[float, dict]]:
    """Each dataset's (weight, config fields), the names and fields checked against the library's registry."""
    registry = require("reasoning_gym", "reasoning-gym").factory.DATASETS
    composite = len(spec.datasets) > 1
    configs = {name: [1.0, {}] for name in spec.datasets}
    for key, value in spec.options:
        name, _, field = key.rpartition(".") if composite else ("", "", key)
        if composite and name not in configs:
            raise ValueError(
                f"task {spec.name!r}: option {key!r} names no dataset of the mix; in a composite write "
                f"NAME.field=value with NAME one of {list(spec.datasets)}"
            )
        if field == "weight" and composite:
            configs[name][0] = value
        else:
            configs[name if composite else spec.datasets[0]][1][field] = value
    for name, (_, config) in configs.items():
        check_dataset(spec.name, name, config, registry)
    return {name: (weight, config) for name, (weight, config) in configs.items()}


def check_dataset(task: str, name: str, config: dict, registry: dict) -> None:
    if name not in registry or name == "composite":
        close = difflib.get_close_matches(name, list(registry), n=3)
        raise ValueError(
            f"task {task!r}: reasoning-gym has no dataset {name!r}"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "; reasoning_gym.factory.DATASETS lists them"
        )
    allowed = [f.name for f in fields(registry[name][1]) if f.name not in ("seed", "size")]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(
            f"task {task!r}: {unknown} are not fields of {name}'s config (it has {allowed}); the splits' seed and "
            "size are set with seed=, size= and eval_size="
        )


def build_dataset(spec: Spec, split: str, size: int):
    """The split's dataset: ``spec``'s datasets (a composite for several) with the split's seed."""
    reasoning_gym = require("reasoning_gym", "reasoning-gym")
    configs = dataset_configs(spec)
    seed = spec.split_seed(split)
    try:
        if len(configs) == 1:
            [(name, (_, config))] = configs.items()
            return reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
        from reasoning_gym.composite import DatasetSpec

        mix = [DatasetSpec(name, weight, config) for name, (weight, config) in configs.items()]
        return reasoning_gym.create_dataset("composite", seed=seed, size=size, datasets=mix)
    except (AssertionError, TypeError, ValueError) as error:
        reason = error or type(error).__name__
        raise ValueError(f"task {spec.name!r}: reasoning-gym refused the config: {reason}") from error


def load_rows(name: str, split: str) -> list[dict]:
    """The split's rows, ``{"prompt": question, "question", "answer", "metadata"}``; eval skips train questions."""
    spec = parse(name)
    train = [as_row(entry) for entry in build_dataset(spec, "train", spec.size)]
    if split == "train":
        return train
    return draw_unseen(spec, "eval", spec.eval_size, {row["prompt"] for row in train}, "eval_size")


def sft_rows(name: str, size: int) -> list[dict]:
    """``size`` rows to fine-tune a policy on the task before RL (question in, answer out): drawn with a seed past
    both splits' random streams, and none of them a train or eval question."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    seen = {row["prompt"] for split in ("train", "eval") for row in load_rows(name, split)}
    return draw_unseen(parse(name), "sft", size, seen, "size")


def draw_unseen(spec: Spec, split: str, size: int, seen: set[str], what: str) -> list[dict]:
    """``size`` rows of the split's dataset whose questions are not in ``seen``, in order, skipping the others."""
    dataset = build_dataset(spec, split, size)
    rows = []
    for index in range(size * MAX_TRIES):
        entry = dataset[index]
        if entry["question"] not in seen:
            rows.append(as_row(entry))
            if len(rows) == size:
                return rows
    raise ValueError(
        f"task {spec.name!r}: only {len(rows)} of {size * MAX_TRIES} {split} questions drawn are not questions of "
        f"the splits before it, fewer than {what}={size}; ask for fewer, or widen the generator's config"
    )


def as_row(entry: dict) -> dict:
    return {"prompt": entry["question"]} | {key: entry[key] for key in ("question", "answer", "metadata")}


class ScoreAnswer:
    """The reward function of a reasoning-gym task: the dataset's ``score_answer(response, entry)``, as given.

    It keeps only the task name (the dataset is rebuilt on first use), so it pickles.
    """

    __name__ = "score_answer"

    def __init__(self, name: str):
        self.name, self._dataset = name, None

    def __getstate__(self) -> dict:
        return {"name": self.name, "_dataset": None}

    def __call__(self, response: str, row: dict, **kwargs) -> float:
        spec = parse(self.name)
        if self._dataset is None:
            self._dataset = build_dataset(spec, "train", 1)
        answer = response
        if spec.answer_tag is not None:
            answer = require("reasoning_gym.utils", "reasoning-gym").extract_answer(response, tag_name=spec.answer_tag)
        entry = {"question": row["question"], "answer": row["answer"], "metadata": row["metadata"]}
        return float(self._dataset.score_answer(answer, entry))


def task(name: str) -> EmbeddedTask:
    """The task ``name``: its rows per split, ``score_answer`` as reward and accuracy term, no model of its own.
    The datasets and their configs are checked here (the library is imported), before any model loads."""
    spec = parse(name)
    dataset_configs(spec)
    build_dataset(spec, "train", 1)  # the library's own config checks
    return EmbeddedTask(
        name,
        MissingModel(name),
        None,
        partial(load_rows, name),
        {"score_answer": ScoreAnswer(name)},
        accuracy="score_answer",
        limits=LIMITS,
    )
