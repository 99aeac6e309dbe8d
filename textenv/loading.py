"""Load what an env needs from a ``TokenEnvConfig``: models, tokenizer and prompts, each checked.

Models and tokenizers come from loaded objects, local directories or hub names.
Every model the env holds is frozen: eval mode (dropout off), no gradients, on
one device. Nothing here downloads unless given a hub name that is not cached
locally; the tests only ever pass local directories or loaded modules.
"""

from __future__ import annotations

import json
import os
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

from textenv.config import ModelLike, TokenEnvConfig
from textenv.default_task import load_prompts
from textenv.lm import disable_dropout, sequence_scores
from textenv.reward_fns import RewardFunction, StepRewardFunction, import_reward_fn, resolve_reward_fns
from textenv.tasks import get_task
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


def _from_pretrained(auto_class, source: str | os.PathLike, what: str, **kwargs):
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
    return _from_pretrained(AutoTokenizer, source, what)


def freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Eval mode, no gradients, on ``device``: the state of every model the env holds."""
    model = model.to(device).eval()
    disable_dropout(model)  # eval mode is enough for Hugging Face models; rates kept as numbers go too
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_causal_lm(source: ModelLike, device: torch.device, what: str = "reference model") -> PreTrainedModel:
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    return freeze(_from_pretrained(AutoModelForCausalLM, source, what), device)


def load_reward_model(source: ModelLike, device: torch.device) -> PreTrainedModel:
    """A sequence classifier with one label; a directory holding anything else is refused before loading."""
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    config = load_config(source, "reward model")
    check_reward_model_config(config, os.fspath(source))
    return freeze(_from_pretrained(AutoModelForSequenceClassification, source, "reward model"), device)


def load_config(source: str | os.PathLike, what: str):
    """A model's ``AutoConfig``; ``what`` names the argument in errors."""
    return _from_pretrained(AutoConfig, source, what)


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
    blank lines skipped), a JSON-lines file (``.jsonl``: one row a line) or a directory
    saved with ``datasets``' ``save_to_disk`` (a dataset dict gives its ``split``).
    ``what`` names the argument in errors.
    """
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts).expanduser()
        if path.is_dir() and any((path / name).is_file() for name in DATASET_FILES):
            prompts = load_dataset_dir(path, what)
        elif path.suffix == ".jsonl":
            prompts = read_jsonl_rows(path, prompt_column, what)
        else:
            return check_prompts(read_prompt_file(path, what), what), []
    if hasattr(prompts, "column_names") and isinstance(prompts.column_names, Mapping):  # a datasets.DatasetDict
        prompts = prompts[dataset_split(prompts, split, what)]
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
    """Load the config's models, tokenizer, prompts and reward functions, and check that they fit together."""
    device = resolve_device(config.device)
    embedded = get_task(config.task)
    reference_source = embedded.policy_dir if config.reference_model is None else config.reference_model
    tokenizer = config.tokenizer
    if tokenizer is None:
        if isinstance(reference_source, torch.nn.Module):
            raise ValueError("pass tokenizer= when reference_model is a loaded module")
        tokenizer = load_tokenizer(reference_source, what="reference model (and its tokenizer)")
    tokenizer = load_tokenizer(tokenizer)
    reference = load_causal_lm(reference_source, device)
    reward_fns = resolve_reward_fns(config.reward_fns or embedded.reward_fns, config.reward_weights)
    interaction = load_interaction(config, embedded)
    reward_source = config.reward_model
    if reward_source is None and not config.reward_fns:
        reward_source = embedded.reward_model_dir
    if reward_source is None and not reward_fns and interaction is None:
        raise ValueError("nothing pays a score: pass reward_model=, reward_fns= (--reward-fn) or both")
    context_length = config.window(turns=interaction is not None)
    reward_model = reward_tokenizer = None
    if reward_source is not None:
        reward_model = load_reward_model(reward_source, device)
        reward_tokenizer = reward_model_tokenizer(config.reward_tokenizer, reward_source, tokenizer)
    check_special_tokens(tokenizer)
    reads_ids = reward_model is not None and reward_tokenizer is None
    vocab_size = check_vocabularies(tokenizer, reference, reward_model if reads_ids else None, config.policy)
    for name, model in (("reference model", reference), ("reward model", reward_model if reads_ids else None)):
        limit = None if model is None else model_positions(model)
        if limit is not None and context_length > limit:
            what = (
                "max_prompt_tokens + max_new_tokens"
                if interaction is None
                else ("max_prompt_tokens + max_turns * max_new_tokens + (max_turns - 1) * max_env_tokens")
            )
            raise ValueError(f"{what} = {context_length} exceeds the {name}'s {limit} positions; lower one of them")
    if reward_model is not None:
        check_reward_model_output(reward_model, tokenizer if reward_tokenizer is None else reward_tokenizer, device)
    if config.prompts is None:
        prompts, rows = read_prompt_rows(embedded.prompt_rows(config.split), "prompt", what=f"{config.task} prompts")
    else:
        prompts, rows = read_prompt_rows(config.prompts, config.prompt_column, config.split)
    texts, prompt_ids = tokenize_prompts(
        prompts, tokenizer, config.max_prompt_tokens, config.prompt_truncation, config.chat_template
    )
    conversations = [as_conversation(p) if config.chat_template or not isinstance(p, str) else None for p in prompts]
    step_fn = config.step_reward_fn
    if isinstance(step_fn, str):
        step_fn = import_reward_fn(step_fn, "step_reward_fn")
    elif step_fn is not None and not callable(step_fn):
        raise TypeError(f"step_reward_fn must be a callable or module:function text, got {type(step_fn).__name__}")
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
        step_reward_fn=None if step_fn is None else StepRewardFunction(step_fn),
        accuracy=embedded.accuracy if not config.reward_fns else None,
        interaction=interaction,
        end_of_turn_id=None if interaction is None else end_of_turn_id(config.end_of_turn_token, tokenizer),
        context_length=context_length,
    )


def load_interaction(config: TokenEnvConfig, embedded) -> Interaction | None:
    """The config's interaction (an object, or module:name text; a class is instantiated), else the task's."""
    interaction = config.interaction
    if interaction is None and embedded.interaction is not None:
        interaction = embedded.interaction()
    if interaction is None:
        return None
    if isinstance(interaction, str):
        found = import_reward_fn(interaction, "interaction")
        interaction = found() if isinstance(found, type) else found
    if not callable(getattr(interaction, "respond", None)):
        raise TypeError(
            f"interaction must have a respond(turn) method (see textenv.turns), got {type(interaction).__name__}"
        )
    if config.reward_mode == "dense":
        raise ValueError("reward_mode='dense' with an interaction is not supported; use 'sparse'")
    return interaction


def end_of_turn_id(token: int | str | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the end-of-turn token (default EOS); an unknown token is an error."""
    if token is None:
        return tokenizer.eos_token_id
    if isinstance(token, str):
        ids = tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"end_of_turn_token {token!r} is not a token of the tokenizer; give its text or id")
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
    if isinstance(policy, torch.nn.Module) and output_vocab_size(policy) != vocab_size:
        raise ValueError(
            f"the policy predicts {output_vocab_size(policy)} tokens but the reference model {vocab_size}; "
            "they must share one vocabulary"
        )
    return vocab_size


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
    template. Plain prompt text is text: "<eos>" typed in a prompt never becomes the EOS token.
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
            ids = tokenizer(prompt, split_special_tokens=True)["input_ids"]
        prompt_ids.append(list(ids))
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
    """The tokenizer has a chat template, and no message smuggles in a special token's text."""
    if not tokenizer.chat_template:
        raise ValueError(
            f"prompt {index} is a chat conversation (or chat_template=True), but the tokenizer has no chat "
            "template; set tokenizer.chat_template or pass plain string prompts"
        )
    specials = [token for token in tokenizer.all_special_tokens if token]
    for message in messages:
        found = [token for token in specials if token in message["content"]]
        if found:
            raise ValueError(
                f"prompt {index}: a {message['role']} message contains the text of the special token {found[0]!r}, "
                "which the chat template would turn into that control token; remove it from the message"
            )
