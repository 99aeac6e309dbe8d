"""Helpers shared by everything that runs a causal LM or a reward model on padded batches.

Convention: a batch is ``input_ids`` (B, T) with ``attention_mask`` (B, T), real
tokens contiguous in each row. Position ids always come from the mask, so a row
means the same thing whether it is padded on the left or on the right.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row; pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def to_left_padding(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the right end, so the last real token sits at index -1."""
    length = input_ids.shape[1]
    last_real = torch.where(attention_mask.bool(), torch.arange(length, device=input_ids.device), -1).amax(-1)  # (B,)
    shift = length - 1 - last_real  # how far each row moves right
    source = (torch.arange(length, device=input_ids.device) - shift[:, None]) % length  # (B, T)
    ids = input_ids.gather(1, source)
    mask = attention_mask.gather(1, source)
    return ids.masked_fill(mask == 0, pad_token_id), mask


@contextmanager
def pooling_at_last_position(model: torch.nn.Module) -> Iterator[None]:
    """Make a sequence classifier pool at index -1, even where the last real token is the PAD id.

    Hugging Face's classifiers pool at "the rightmost token that is not pad_token_id".
    Our batches are left-padded, so index -1 is always the last real token; hiding the
    pad id for the call keeps a PAD token generated as an action from being skipped.
    """
    config = model.config
    saved = config.pad_token_id
    config.pad_token_id = -1  # no token has this id
    try:
        yield
    finally:
        config.pad_token_id = saved


@torch.no_grad()
def sequence_scores(reward_model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One scalar per row, read by a frozen ``reward_model`` at the row's last real token. Returns (B,)."""
    return sequence_scores_with_grad(reward_model, input_ids, attention_mask)


def sequence_scores_with_grad(reward_model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``sequence_scores`` that keeps the graph, for training a reward model. Returns (B,).

    Works for any padding side: rows are re-laid to left padding first and the head
    pools at index -1 (``pooling_at_last_position``); position ids come from the mask.
    """
    pad = reward_model.config.pad_token_id
    ids, mask = to_left_padding(input_ids, attention_mask, pad if pad is not None else 0)
    logits = reward_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    if logits.shape != (input_ids.shape[0], 1):
        raise ValueError(
            f"the reward model must output one scalar per sequence, shape (batch, 1), but gave "
            f"{tuple(logits.shape)}; load it with AutoModelForSequenceClassification and num_labels=1"
        )
    return logits[:, 0].float()


@dataclass
class Samples:
    """Sampled continuations of a batch of prompts."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including EOS when there is one
    ended_with_eos: list[bool]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample from the plain softmax of ``logits / temperature`` with a KV cache.

    No top-k, top-p or minimum length: the samples follow exactly the distribution
    whose log-probabilities an RL learner will compute.
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_batch(prompt_ids, pad_token_id, side="left"))
    position = position_ids_from_mask(mask)[:, -1:]  # (B, 1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    tokens = []
    for step in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (B, V)
        token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        tokens.append(token)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        position = position + 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    generated = torch.cat(tokens, dim=1).tolist()
    responses, ended = [], []
    for row in generated:
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        responses.append(row)
        ended.append(row[-1] == eos_token_id)
    return Samples(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses, ended_with_eos=ended)


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Pad token-id lists into (ids, mask) tensors of shape (B, max_len)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
