"""Load what an env needs from a ``TokenEnvConfig``: models, tokenizer and prompts, each checked.

Models and tokenizers come from loaded objects, local directories or hub names.
Every model the env holds is frozen: eval mode (dropout off), no gradients, on
one device; those it loads itself are in the config's precision (bf16 or fp32),
cast once as they load. Nothing here downloads unless given a hub name that is not cached
locally; the tests only ever pass local directories or loaded modules.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from textenv.config import PRECISION_DTYPES, ModelLike, TokenEnvConfig, resolve_config, resolve_precision
from textenv.default_task import load_prompts
from textenv.lm import disable_dropout, sequence_scores
from textenv.reward_fns import RewardFunction, StepRewardFunction, import_reward_fn, resolve_reward_fns
from textenv.tasks import get_task
from textenv.text import control_text_in, encode_text
from textenv.turns import Interaction


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when there is one, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def looks_like_path(source: str | os.PathLike) -> bool:
    """A local path rather than a hub name ("org/name"): a path object, or text that starts like one."""
    text = os.fspath(source)
    return isinstance(source, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1


def load_pretrained(auto_class, source: str | os.PathLike, what: str, **kwargs):
    """``auto_class.from_pretrained`` with an error that names the path when it cannot be found."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if looks_like_path(source):
        if not path.exists():
            raise FileNotFoundError(
                f"{what} path {text!r} does not exist; pass an existing directory, a hub name or a loaded model"
            )
    quiet = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per model is noise in an env's constructor
    try:
        return auto_class.from_pretrained(str(path) if path.exists() else text, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load the {what} from {text!r}: it is neither a local directory with a saved model "
            f"nor a hub name available offline ({error})"
        ) from error
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def load_tokenizer(
    source: str | os.PathLike | PreTrainedTokenizerBase, what: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """``what`` names the argument the path came from in errors (the tokenizer may come from a model's path)."""
    if isinstance(source, PreTrainedTokenizerBase):
        return source
    return load_pretrained(AutoTokenizer, source, what)


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device``: the state of every model the env holds."""
    model = model.to(device).eval()
    disable_dropout(model)  # eval mode is enough for Hugging Face models; rates kept as numbers go too
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_causal_lm(
    source: ModelLike, device: torch.device, what: str = "reference model", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """``dtype``: what a model loaded from ``source`` is cast to (None: the checkpoint's); a loaded one keeps its
    own."""
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    return freeze(load_pretrained(AutoModelForCausalLM, source, what, **dtype_argument(dtype)), device)


def load_reward_model(source: ModelLike, device: torch.device, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A sequence classifier with one label; a directory holding anything else is refused before loading.
    ``dtype`` as ``load_causal_lm``'s."""
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    config = load_config(source, "reward model")
    check_reward_model_config(config, os.fspath(source))
    model = load_pretrained(AutoModelForSequenceClassification, source, "reward model", **dtype_argument(dtype))
    return freeze(model, device)


def dtype_argument(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: the weights are cast once, as they load (bf16: no fp32 copy is ever
    held), and the model's modules that transformers keeps in fp32 stay so."""
    return {} if dtype is None else {"dtype": dtype}


def load_config(source: str | os.PathLike, what: str):
    """A model's ``AutoConfig``; ``what`` names the argument in errors."""
    return load_pretrained(AutoConfig, source, what)


def check_reward_model_config(config, source: str) -> None:
    """A causal LM would get a random score head, a classifier with several labels fails on its head's shape."""
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ValueError(
            f"reward model {source!r} is a {', '.join(architectures)}, not a sequence classifier: loading it as "
            "one would add a randomly initialised score head and the rewards would be noise. Pass a reward model "
            "trained with a one-label head (AutoModelForSequenceClassification, num_labels=1)"
        )
    if config.num_labels != 1:
        raise ValueError(
            f"reward model {source!r} has a classifier head with {config.num_labels} labels; the env needs one "
            "scalar score per response (num_labels=1). A preference model with two logits can be turned into "
            "one by keeping the difference of its two rows of the score weight"
        )


def reward_model_tokenizer(
    given: str | os.PathLike | PreTrainedTokenizerBase | None, reward_source: ModelLike, policy_tokenizer
) -> PreTrainedTokenizerBase | None:
    """The reward model's own tokenizer when it differs from the policy's, else None (it then reads token ids).

    ``given`` is the config's ``reward_tokenizer``; without it, a tokenizer saved in the
    reward model's directory is used.
    """
    if given is None:
        if isinstance(reward_source, torch.nn.Module):
            return None
        path = Path(os.fspath(reward_source)).expanduser()
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            return None
        given = path
    own = load_tokenizer(given, what="reward model's tokenizer")
    return None if own.get_vocab() == policy_tokenizer.get_vocab() else own


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output embedding: the size of the distribution it predicts."""
    return model.get_output_embeddings().weight.shape[0]


def model_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model can attend to, where its config says."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


Prompt = str | list[dict[str, str]]  # a text, or a chat conversation: [{"role": ..., "content": ...}, ...]


def is_conversation(prompt) -> bool:
    return (
        isinstance(prompt, list)
        and len(prompt) > 0
        and all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    )


def read_prompts(
    prompts: Sequence[Prompt] | str | os.PathLike | None, prompt_column: str = "prompt", what: str = "prompts"
) -> list[Prompt]:
    """The prompts of ``read_prompt_rows`` without their rows; ``None``: the embedded review task's train prompts."""
    if prompts is None:
        return load_prompts("train")
    return read_prompt_rows(prompts, prompt_column, what=what)[0]


def read_prompt_rows(
    prompts, prompt_column: str = "prompt", split: str = "train", what: str = "prompts"
) -> tuple[list[Prompt], list[dict]]:
    """Prompts and each one's data row (its other columns) from a list, a file or a ``datasets`` dataset.

    A prompt is a string or a chat conversation; a list may also hold rows, dicts with
    the prompt under ``prompt_column``. Files: a UTF-8 text file (one prompt a line,
    blank lines skipped; one whose every line is a JSON object is refused as misnamed
    JSON lines), a JSON-lines file (``.jsonl`` or ``.ndjson``: one row a line), a
    ``.json`` file (a JSON list, or JSON lines as ``datasets``' ``to_json`` writes them),
    suffixes in any case, or a directory saved with ``datasets``' ``save_to_disk``.
    ``split`` chooses the split of a dataset dict; data without splits has every row in
    ``"train"``, and any other ``split`` of it is refused. ``what`` names the argument in
    errors.
    """
    source = describe_prompts(prompts, what)
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts).expanduser()
        source = f"{what} file {os.fspath(path)!r}"
        if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
            prompts = load_dataset_dir(path, what)
        elif path.suffix.lower() in JSON_LINES_SUFFIXES:
            prompts = read_jsonl_rows(path, prompt_column, what)
        elif path.suffix.lower() == ".json":
            prompts = read_json_rows(path, prompt_column, what)
        else:
            lines = read_prompt_file(path, what)
            check_not_json_lines(lines, path, what)
            check_no_split(split, source, what)
            return check_prompts(lines, what), []
    if hasattr(prompts, "column_names") and isinstance(prompts.column_names, Mapping):  # a datasets.DatasetDict
        prompts = prompts[dataset_split(prompts, split, what)]
    else:
        check_no_split(split, source, what)
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        if prompt_column not in prompts.column_names:
            raise ValueError(
                f"the dataset has no column {prompt_column!r} (it has {prompts.column_names}); pass prompt_column="
            )
        columns = {name: list(prompts[name]) for name in prompts.column_names}
        prompts = [dict(zip(columns, values)) for values in zip(*columns.values())]
    prompts = list(prompts)
    rows = [prompt for prompt in prompts if isinstance(prompt, Mapping)]
    if not rows:
        return check_prompts(prompts, what), []
    if len(rows) != len(prompts):
        raise ValueError(f"{what} mixes data rows (dicts) with plain prompts; give every prompt as a row, or none")
    for number, row in enumerate(rows):
        if prompt_column not in row:
            raise ValueError(
                f"{what} row {number} has no {prompt_column!r} key (it has {sorted(row)}); name the prompt's key "
                "with prompt_column= (--prompt-column)"
            )
    texts = check_prompts([row[prompt_column] for row in rows], what)
    return texts, [{k: v for k, v in row.items() if k != prompt_column} for row in rows]


DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
SPLIT_ALIASES = {"eval": ("eval", "test", "validation"), "test": ("test", "eval", "validation")}
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")  # compared in lower case: .JSONL too
ALL_ROWS_SPLIT = "train"  # the split that means "every row" of data without splits (the default)


def has_splits(prompts) -> bool:
    """Whether ``prompts`` has splits to choose from with ``split=``: a ``datasets`` dataset dict, loaded or saved
    (a list, a text or JSON file and a single dataset have none)."""
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts).expanduser()
        return path.is_dir() and (path / "dataset_dict.json").is_file()
    return hasattr(prompts, "column_names") and isinstance(prompts.column_names, Mapping)


def eval_split(prompts, split: str) -> str:
    """The split to evaluate on: ``split`` of the task's prompts (``prompts`` None) or of prompts that have splits;
    "train", the default that reads every row, of prompts of one's own that have none (all of them are eval
    prompts then; ``split="eval"`` would be refused)."""
    return split if prompts is None or has_splits(prompts) else "train"


def describe_prompts(prompts, what: str) -> str:
    if hasattr(prompts, "column_names"):
        return f"{what} (a datasets.Dataset, not a DatasetDict)"
    return what


def check_no_split(split: str, source: str, what: str) -> None:
    """Data without splits has every row in the default split; any other split of it is refused."""
    if split != ALL_ROWS_SPLIT:
        raise ValueError(
            f"split={split!r}, but {source} has no splits: every row would be used, whatever the split. Pass the "
            f"prompts of that split themselves as {what}= (with split left {ALL_ROWS_SPLIT!r}), or a datasets "
            f"DatasetDict (or its saved directory) that has a {split!r} split"
        )


def dataset_split(dataset_dict, split: str, what: str) -> str:
    """The split of a dataset dict that ``split`` names ("eval" also finds "test" or "validation")."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in dataset_dict:
            return name
    raise ValueError(f"{what}: the dataset has the splits {sorted(dataset_dict)}, not {split!r}; pass split=")


def check_prompts(prompts: list, what: str) -> list[Prompt]:
    if not prompts or not all(isinstance(p, str) or is_conversation(p) for p in prompts):
        raise ValueError(
            f"{what} must be a non-empty list of strings (or of chat conversations, lists of "
            "{'role': ..., 'content': ...} dicts, or of data rows with the prompt under prompt_column)"
        )
    return prompts


def load_dataset_dir(path: Path, what: str):
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"{what} directory {os.fspath(path)!r} is a saved dataset: pip install datasets") from error
    return datasets.load_from_disk(os.fspath(path))


def read_json_rows(path: Path, column: str, what: str) -> list:
    """A ``.json`` file: a JSON list (of prompts, conversations or rows), or JSON lines (one row a line, as
    ``datasets``' ``to_json`` writes them)."""
    text = "\n".join(read_prompt_file(path, what))
    try:
        data = json.loads(text)
    except ValueError:
        return read_jsonl_rows(path, column, what)  # several JSON values: JSON lines
    if isinstance(data, dict) and "\n" not in text:
        return [data]  # JSON lines of one row
    if not isinstance(data, list):
        raise ValueError(
            f"{what} file {os.fspath(path)!r} holds a JSON {type(data).__name__}; a .json prompt file holds a JSON "
            f"list (of prompts, conversations or rows with the prompt under {column!r}) or JSON lines (one row a line)"
        )
    return data


def check_not_json_lines(lines: list[str], path: Path, what: str) -> None:
    """A text file whose every line is a JSON object is JSON lines under another name: refused, not read as text."""
    for line in lines:
        try:
            if not isinstance(json.loads(line), dict):
                return
        except ValueError:
            return
    raise ValueError(
        f"{what} file {os.fspath(path)!r} holds JSON lines (every line is a JSON object), but its name does not end "
        "in .jsonl or .json, so each line would be a prompt as it is written, braces and all; rename it to .jsonl "
        "(the prompt is the prompt_column field of each row)"
    )


def read_jsonl_rows(path: Path, column: str, what: str) -> list[dict]:
    rows = []
    for number, line in enumerate(read_prompt_file(path, what), start=1):
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{what} file {os.fspath(path)!r}, line {number}, is not JSON ({error})") from error
        if not isinstance(row, dict) or column not in row:
            raise ValueError(
                f"{what} file {os.fspath(path)!r}, line {number}, has no {column!r} field; name the prompt's "
                "field with prompt_column= (--prompt-column)"
            )
        rows.append(row)
    return rows


def read_prompt_file(path: Path, what: str) -> list[str]:
    if path.is_dir():
        raise IsADirectoryError(f"{what} file {os.fspath(path)!r} is a directory; pass a text file, one prompt a line")
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file {os.fspath(path)!r} does not exist; pass a list of strings or a path to a text "
            "file with one prompt per line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} file {os.fspath(path)!r} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from error
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{what} file {os.fspath(path)!r} holds no prompts (it is empty or blank)")
    return prompts


@dataclass
class Task:
    """A ``TokenEnvConfig``, loaded and checked: frozen models, tokenizer, prompts and their rows, the reward."""

    tokenizer: PreTrainedTokenizerBase
    reference_model: PreTrainedModel
    reward_model: PreTrainedModel | None  # None: only reward functions pay
    prompts: list[str]
    prompt_ids: list[list[int]]
    vocab_size: int  # the action space: the reference model's output vocabulary
    reward_tokenizer: PreTrainedTokenizerBase | None = None  # the reward model's own, when it is another
    conversations: list[list[dict[str, str]] | None] | None = None  # per prompt, its chat messages if it has them
    rows: list[dict] = field(default_factory=list)  # per prompt, its other data columns ({} when it has none)
    reward_fns: list[RewardFunction] = field(default_factory=list)
    step_reward_fn: StepRewardFunction | None = None
    accuracy: str | None = None  # the reward function that says whether an answer is right, if the task has one
    interaction: Interaction | None = None  # multi-turn episodes: what answers each agent turn
    end_of_turn_id: int | None = None  # with an interaction: the token that ends an agent turn
    context_length: int = 0  # the observation window


def load_task(config: TokenEnvConfig) -> Task:
    """Load the config's models, tokenizer, prompts and reward functions, and check that they fit together.

    ``config`` is resolved first (``resolve_config``): the fields it leaves unset are its task's.
    """
    config = resolve_config(config)
    device = resolve_device(config.device)
    dtype = PRECISION_DTYPES[resolve_precision(config.precision, device)]  # bf16 where the device lacks it: refused
    tokenizer = load_policy_tokenizer(config)
    reference = load_causal_lm(config.reference_model, device, dtype=dtype)
    reward_fns = resolve_reward_fns(config.reward_fns, config.reward_weights)
    check_accuracy_term(config.accuracy_term, reward_fns)
    interaction = load_interaction(config)
    if config.reward_model is None and not reward_fns and interaction is None:
        raise ValueError("nothing pays a score: pass reward_model=, reward_fns= (--reward-fn) or both")
    reward_model = reward_tokenizer = None
    if config.reward_model is not None:
        reward_model = load_reward_model(config.reward_model, device, dtype)
        reward_tokenizer = reward_model_tokenizer(config.reward_tokenizer, config.reward_model, tokenizer)
    check_special_tokens(tokenizer)
    reads_ids = reward_model is not None and reward_tokenizer is None
    vocab_size = check_vocabularies(tokenizer, reference, reward_model if reads_ids else None, config.policy)
    context_length = config.window(turns=interaction is not None)
    check_positions(context_length, interaction is not None, reference, reward_model if reads_ids else None)
    if reward_tokenizer is not None:
        check_reward_tokenizer(reward_tokenizer, reward_model)
    if reward_model is not None:
        check_reward_model_output(reward_model, tokenizer if reward_tokenizer is None else reward_tokenizer, device)
    prompts, rows = read_task_prompts(config)
    texts, prompt_ids = tokenize_prompts(
        prompts, tokenizer, config.max_prompt_tokens, config.prompt_truncation, config.chat_template
    )
    conversations = [as_conversation(p) if config.chat_template or not isinstance(p, str) else None for p in prompts]
    if reward_tokenizer is not None:
        check_reward_reading(texts, conversations, reward_tokenizer)
    return Task(
        tokenizer,
        reference,
        reward_model,
        texts,
        prompt_ids,
        vocab_size,
        reward_tokenizer,
        conversations,
        rows=rows or [{} for _ in texts],
        reward_fns=reward_fns,
        step_reward_fn=load_step_reward_fn(config.step_reward_fn),
        accuracy=config.accuracy_term,
        interaction=interaction,
        end_of_turn_id=None if interaction is None else end_of_turn_id(config.end_of_turn_token, tokenizer),
        context_length=context_length,
    )


def check_reward_reading(texts: list[str], conversations: list, reward_tokenizer) -> None:
    """What a reward model with its own tokenizer reads of the prompts: no message spells one of its control
    tokens (when it reads conversations in its chat template), and its tokenizer can write the prompt texts."""
    if reward_tokenizer.chat_template:
        for index, messages in enumerate(conversations):
            if messages is not None:
                check_messages(messages, reward_tokenizer, index, "reward model's tokenizer")
    ids = [encode_text(reward_tokenizer, text, add_special_tokens=False) for text in texts]
    check_coverage(texts, ids, reward_tokenizer, "reward model's tokenizer")


def load_policy_tokenizer(config: TokenEnvConfig) -> PreTrainedTokenizerBase:
    """The config's tokenizer, else the one saved with the reference model."""
    if config.tokenizer is not None:
        return load_tokenizer(config.tokenizer)
    if isinstance(config.reference_model, torch.nn.Module):
        raise ValueError("pass tokenizer= when reference_model is a loaded module")
    return load_tokenizer(config.reference_model, what="reference model (and its tokenizer)")


def check_accuracy_term(accuracy_term: str | None, reward_fns: list[RewardFunction]) -> None:
    names = [fn.name for fn in reward_fns]
    if accuracy_term is not None and accuracy_term not in names:
        raise ValueError(
            f"accuracy_term {accuracy_term!r} names no reward function of the env (they are {names}); name the one "
            "that pays 1 for a right answer and 0 for a wrong one"
        )


def check_positions(context_length: int, turns: bool, reference: torch.nn.Module, reward_model) -> None:
    """The observation window fits the positions of the reference model and of a reward model reading ids."""
    for name, model in (("reference model", reference), ("reward model", reward_model)):
        limit = None if model is None else model_positions(model)
        if limit is not None and context_length > limit:
            what = (
                "max_prompt_tokens + max_turns * max_new_tokens + (max_turns - 1) * max_env_tokens"
                if turns
                else "max_prompt_tokens + max_new_tokens"
            )
            raise ValueError(f"{what} = {context_length} exceeds the {name}'s {limit} positions; lower one of them")


def read_task_prompts(config: TokenEnvConfig) -> tuple[list[Prompt], list[dict]]:
    """The config's prompts and their rows, else its task's prompts of ``split``."""
    if config.prompts is None:
        rows = get_task(config.task).prompt_rows(config.split)
        return read_prompt_rows(rows, "prompt", what=f"{config.task} prompts")
    return read_prompt_rows(config.prompts, config.prompt_column, config.split)


def load_step_reward_fn(step_fn) -> StepRewardFunction | None:
    """The config's ``step_reward_fn`` (a callable or module:function text), wrapped; None stays None."""
    if isinstance(step_fn, str):
        step_fn = import_reward_fn(step_fn, "step_reward_fn")
    elif step_fn is not None and not callable(step_fn):
        raise TypeError(f"step_reward_fn must be a callable or module:function text, got {type(step_fn).__name__}")
    return None if step_fn is None else StepRewardFunction(step_fn)


def load_interaction(config: TokenEnvConfig) -> Interaction | None:
    """The resolved config's interaction: an object, or its class or module:name text (a class is instantiated)."""
    interaction = config.interaction
    if interaction is None:
        return None
    if isinstance(interaction, str):
        interaction = import_reward_fn(interaction, "interaction")
    if isinstance(interaction, type):
        interaction = interaction()
    if not callable(getattr(interaction, "respond", None)):
        raise TypeError(
            f"interaction must have a respond(turn) method (see textenv.turns), got {type(interaction).__name__}"
        )
    return interaction


def end_of_turn_id(token: int | str | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the end-of-turn token (default EOS): an id, or a text that the tokenizer writes as exactly one
    token ("and" is the token that "and" tokenizes to, not a vocabulary entry spelled "and"; a control token's
    text, such as "<|eot_id|>", is that token)."""
    if token is None:
        return tokenizer.eos_token_id
    if isinstance(token, str):
        ids = list(tokenizer(token, add_special_tokens=False)["input_ids"])
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"end_of_turn_token {token!r} is not one token of the tokenizer: it tokenizes to {len(ids)} "
                f"token(s) {pieces} (ids {ids}); give a text that is exactly one token, or the token's id"
            )
        return int(ids[0])
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < len(tokenizer):
        raise ValueError(f"end_of_turn_token must be a token id in 0..{len(tokenizer) - 1} or a token's text")
    return token


def check_reward_model_output(reward_model: torch.nn.Module, scoring_tokenizer, device: torch.device) -> None:
    """A reward model without one scalar output per sequence raises; its PAD is the scoring tokenizer's."""
    if getattr(reward_model.config, "pad_token_id", None) is None:  # classifiers pool at the last non-pad token
        reward_model.config.pad_token_id = scoring_tokenizer.pad_token_id
    probe = torch.tensor([[scoring_tokenizer.eos_token_id or 0]], device=device)
    sequence_scores(reward_model, probe, torch.ones_like(probe))


def check_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; episodes end on EOS, so set tokenizer.eos_token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "the tokenizer's PAD token must exist and differ from its EOS token (a model whose PAD is EOS cannot "
            "learn to stop, and the reward model would read the score before the EOS); add one with "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the models' embeddings"
        )


def check_vocabularies(tokenizer, reference: torch.nn.Module, reward_model: torch.nn.Module | None, policy) -> int:
    """The action space's size (the reference model's output vocabulary), once every model can take its ids.

    ``reward_model`` is None when it reads text with its own tokenizer.
    """
    vocab_size = output_vocab_size(reference)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the reference model predicts only {vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    reward_vocab = float("inf") if reward_model is None else reward_model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > reward_vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the reward model embeds only {reward_vocab}; the env "
            "hands it the policy's token ids; if it has its own tokenizer, pass it as reward_tokenizer= (or save it "
            "beside the reward model) and the reward model reads the text instead"
        )
    check_special_ids(tokenizer, vocab_size, "tokenizer", "the reference model predicts")
    if reward_model is not None:
        check_special_ids(tokenizer, reward_vocab, "tokenizer", "the reward model embeds")
    if isinstance(policy, torch.nn.Module) and output_vocab_size(policy) != vocab_size:
        raise ValueError(
            f"the policy predicts {output_vocab_size(policy)} tokens but the reference model {vocab_size}; "
            "they must share one vocabulary"
        )
    return vocab_size


def check_special_ids(tokenizer, rows: int, which: str, model: str) -> None:
    """The tokenizer's special tokens (BOS, EOS, PAD, UNK) are ids of the model: below its ``rows`` tokens."""
    for name in ("bos", "eos", "pad", "unk"):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is not None and not 0 <= index < rows:
            raise ValueError(
                f"the {which}'s {name.upper()} token {getattr(tokenizer, f'{name}_token')!r} has the id {index}, but "
                f"{model} only {rows} tokens (ids 0..{rows - 1}): the {which} does not belong to the model; pass the "
                "tokenizer the model was trained with"
            )


def check_reward_tokenizer(reward_tokenizer, reward_model: torch.nn.Module) -> None:
    """Every id the reward model's own tokenizer writes is a row of the reward model's embedding."""
    rows = reward_model.get_input_embeddings().weight.shape[0]
    if len(reward_tokenizer) > rows:
        raise ValueError(
            f"the reward model's tokenizer has {len(reward_tokenizer)} tokens but the reward model embeds only "
            f"{rows}: a text could tokenize to an id past its embedding (an IndexError at the first scoring). Pass "
            "the reward model's own tokenizer as reward_tokenizer= (or save it beside the reward model)"
        )
    check_special_ids(reward_tokenizer, rows, "reward model's tokenizer", "the reward model embeds")


def tokenize_prompts(
    prompts: list[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    truncation: str,
    chat_template: bool = False,
) -> tuple[list[str], list[list[int]]]:
    """The text and token ids of each prompt; a prompt longer than ``max_prompt_tokens`` raises or keeps its end.

    A conversation (or, with ``chat_template``, a string as one user message) goes through
    the tokenizer's chat template with the generation prompt; its text is the rendered
    template. Prompt text is text (``textenv.text``): "<eos>" typed in a prompt never becomes the EOS token, nor
    any other control token's spelling that token, and a message that spells one is refused. A tokenizer that
    cannot write the prompts is refused or warned about (``check_coverage``).
    """
    texts, prompt_ids = [], []
    for i, prompt in enumerate(prompts):
        if chat_template or not isinstance(prompt, str):
            messages = as_conversation(prompt)
            check_conversation(messages, tokenizer, i)
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        else:
            texts.append(prompt)
            ids = encode_text(tokenizer, prompt)
        prompt_ids.append(list(ids))
    check_coverage(texts, prompt_ids, tokenizer, "tokenizer")
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} ({texts[i]!r}) is empty after tokenization")
        if len(ids) > max_prompt_tokens:
            if truncation == "error":
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}: "
                    f"{texts[i][:60]!r}; raise max_prompt_tokens or pass prompt_truncation='left' to keep each "
                    "prompt's last max_prompt_tokens tokens"
                )
            prompt_ids[i] = ids[-max_prompt_tokens:]
    return texts, prompt_ids


def as_conversation(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def check_conversation(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, index: int) -> None:
    """The tokenizer has a chat template, and no message smuggles in a control token's text."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"prompt {index} is a chat conversation (or chat_template=True), but the tokenizer has no chat "
            "template; set tokenizer.chat_template or pass plain string prompts"
        )
    check_messages(messages, tokenizer, index, "tokenizer")


def check_messages(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, index: int, which: str) -> None:
    """No message contains the text of a control token of ``tokenizer`` (``textenv.text.control_tokens``): its
    chat template would read it as that token, and a message could close its turn and open one of another role.
    ``which`` names the tokenizer in the error ("tokenizer", "reward model's tokenizer")."""
    for message in messages:
        found = control_text_in(message["content"], tokenizer)
        if found:
            kind = "special token" if found[0] in tokenizer.all_special_tokens else "control token"
            raise ValueError(
                f"prompt {index}: a {message['role']} message contains the text of the {kind} {found[0]!r} of "
                f"the {which}, which its chat template would turn into that token (a message could end its turn "
                "and open another, e.g. a system turn); messages are text: remove it from the message, or break "
                "it up (e.g. with a space)"
            )


UNKNOWN_REFUSED = 0.5  # a tokenizer that writes more than this share of the prompt tokens as <unk> is refused


class UnknownTokensWarning(UserWarning):
    """Some prompt tokens are the tokenizer's unknown token: it cannot write some of the prompts' characters."""


def check_coverage(texts: list[str], prompt_ids: list[list[int]], tokenizer, which: str) -> None:
    """The tokenizer can write the prompts: more than ``UNKNOWN_REFUSED`` of their tokens as its unknown token is
    refused (a tokenizer of another vocabulary or task), any at all is warned about; both name the share and the
    characters it has no token for. ``which`` names the tokenizer ("tokenizer", "reward model's tokenizer")."""
    unknown = tokenizer.unk_token_id
    others = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}
    if unknown is None or unknown in others:  # byte-level tokenizers write everything; GPT-2's <unk> is its EOS
        return
    total = sum(len(ids) for ids in prompt_ids)
    count = sum(ids.count(unknown) for ids in prompt_ids)
    if count == 0:
        return
    characters = sorted({ch for text in texts for ch in text})
    missing = [ch for ch in characters if unknown in encode_text(tokenizer, ch, add_special_tokens=False)]
    shown = "".join(missing[:40]) + ("..." if len(missing) > 40 else "")
    what = (
        f"{count} of the {total} prompt tokens ({count / total:.0%}) are the {which}'s unknown token "
        f"{tokenizer.unk_token!r}"
        + (f": it has no token for the characters {shown!r}" if missing else " (whole words it cannot split)")
    )
    if count / total > UNKNOWN_REFUSED:
        raise ValueError(
            f"{what}. The {which} does not fit these prompts (a tokenizer of another vocabulary, or another task's "
            "model?): pass the tokenizer the model was trained with (tokenizer=, reward_tokenizer=; by default the "
            "one saved with the model), and prompts it can write (prompts=, task=)"
        )
    warnings.warn(f"{what}; those characters reach the models as {tokenizer.unk_token!r}", UnknownTokensWarning, 3)
