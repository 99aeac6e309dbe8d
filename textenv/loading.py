"""Load the env's models and tokenizer from loaded objects, local directories or hub names.

Every model the env holds is frozen: eval mode (dropout off), no gradients, on
one device. Nothing here downloads unless given a hub name that is not cached
locally; the tests only ever pass local directories or loaded modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

ModelLike = str | os.PathLike | torch.nn.Module


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when there is one, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _from_pretrained(auto_class, source: str | os.PathLike, what: str, **kwargs):
    """``auto_class.from_pretrained`` with an error that names the path when it cannot be found."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if isinstance(source, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1:
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
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_causal_lm(source: ModelLike, device: torch.device, what: str = "reference model") -> PreTrainedModel:
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    return freeze(_from_pretrained(AutoModelForCausalLM, source, what), device)


def load_reward_model(source: ModelLike, device: torch.device) -> PreTrainedModel:
    if isinstance(source, torch.nn.Module):
        return freeze(source, device)
    return freeze(_from_pretrained(AutoModelForSequenceClassification, source, "reward model", num_labels=1), device)


def output_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output embedding: the size of the distribution it predicts."""
    return model.get_output_embeddings().weight.shape[0]
