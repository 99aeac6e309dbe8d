"""What pays the reward model's part of the score: one ``Scorer`` per way a reward model reads an episode.

- ``SparseScorer``: the reward model reads prompt + response once, on the step the
  episode ends.
- ``DenseScorer``: it steps with the episodes (its own KV cache) and pays each
  prefix's change of score (potential-based shaping).
- ``TurnScorer``: dense in episodes of several turns: the reward model reads the
  context each time an agent turn ends and pays the change of score since the turn
  before, on the turn's last token.
- ``TextScorer``: a reward model with its own tokenizer reads text, sparse or dense
  (in episodes of several turns, dense per turn as ``TurnScorer``).
- ``NoModelScorer``: no reward model; reward functions alone pay.

A scorer reads the episodes' tokens from the env's ``Slots`` and returns, each
step, the score term of the step's reward and the raw score of the episodes that
ended (NaN elsewhere). Scores are clipped to ``score_clip`` here; the missing-EOS
penalty and the reward functions are the core's.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from textenv.config import TokenEnvConfig
from textenv.lm import CachedStepper, pad_batch, sequence_scores
from textenv.loading import Task
from textenv.rewards import clip_score, score_terms
from textenv.slots import Slots
from textenv.text import encode_chat, encode_text


class Scorer(Protocol):
    """The reward model's side of the reward."""

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        """Slots ``rows`` (K,) start on the left-padded prompts ``ids``/``mask`` (K, W)."""

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        """After the live slots' ``tokens`` were appended: (score term of this step's reward, raw score where an
        episode ``ended`` and NaN elsewhere), each (N,). ``turn_ended``: the slots whose agent turn ended this
        step (every ended episode's last turn among them; in single-turn episodes, ``ended``)."""


def nan_where_not(ended: Tensor, score: Tensor) -> Tensor:
    return torch.where(ended, score, torch.full_like(score, float("nan")))


class NoModelScorer:
    """No reward model: the score is the reward functions' alone (0 here)."""

    def __init__(self, num_slots: int, device: torch.device):
        self.zero = torch.zeros(num_slots, device=device)

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        """Nothing to do: no prefix is scored."""

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        return self.zero, nan_where_not(ended, self.zero)


class SparseScorer:
    """The reward model reads prompt + response once, on the step the episode ends."""

    def __init__(self, reward_model: torch.nn.Module, slots: Slots, config: TokenEnvConfig):
        self.reward_model, self.slots, self.score_clip = reward_model, slots, config.score_clip

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        """Nothing to do: no prefix is scored."""

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        score = self.scores(ended)
        clipped = clip_score(torch.where(ended, score, 0.0), self.score_clip)
        return score_terms(clipped, ended), score

    def scores(self, rows_mask: Tensor) -> Tensor:
        """The reward model's score of each slot's tokens where ``rows_mask``, NaN elsewhere (N,)."""
        score = torch.full(rows_mask.shape, float("nan"), device=rows_mask.device)
        rows = rows_mask.nonzero()[:, 0]
        if len(rows):
            sequences = [self.slots.sequence(r) for r in rows.tolist()]
            ids, mask = (t.to(rows_mask.device) for t in pad_batch(sequences, self.slots.pad_token_id))
            score[rows] = sequence_scores(self.reward_model, ids, mask)
        return score


class TurnScorer(SparseScorer):
    """Dense rewards in episodes of several turns: when an agent turn ends, the reward model reads the context
    (prompt, earlier turns and replies, this turn) and the turn's last token is paid the change of the clipped
    score since the previous turn ended (since the prompt, for the first turn). The terms of an episode add up
    to its final clipped score less its prompt's, as dense rewards of one turn do."""

    def __init__(self, reward_model: torch.nn.Module, slots: Slots, config: TokenEnvConfig):
        super().__init__(reward_model, slots, config)
        self.previous = torch.zeros(slots.num_slots, device=next(reward_model.parameters()).device)

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        self.previous[rows] = clip_score(sequence_scores(self.reward_model, ids, mask), self.score_clip)

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        score = self.scores(turn_ended)
        current = torch.where(turn_ended, clip_score(score, self.score_clip), self.previous)
        terms = score_terms(current, ended, previous=self.previous)
        self.previous = current
        return terms, nan_where_not(ended, score)


class DenseScorer:
    """The reward model steps with the episodes (its own KV cache) and pays each prefix's change of score."""

    def __init__(self, reward_model: torch.nn.Module, slots: Slots, config: TokenEnvConfig):
        self.stepper = CachedStepper(reward_model, slots.pad_token_id, scores=True)
        self.slots, self.score_clip = slots, config.score_clip
        self.previous = torch.zeros(slots.num_slots, device=self.stepper.device)  # clipped score of each prefix

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        self.stepper.start(rows, ids, mask, self.slots.contexts)
        self.previous[rows] = clip_score(self.stepper.last[rows], self.score_clip)

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        current = self.stepper.advance(tokens, live)
        clipped = clip_score(current, self.score_clip)
        terms = score_terms(clipped, ended, previous=self.previous)
        self.previous = torch.where(live, clipped, self.previous)
        return terms, nan_where_not(ended, current)


class TextScorer:
    """A reward model with its own tokenizer reads text: the prompt as given, then the decoded response.

    Re-tokenized with the reward model's tokenizer as text (its own special tokens added
    as it adds them; a control token's spelling in the prompt or response stays text)
    and scored by a plain forward: sparse on the step an episode ends, dense on every
    step for every live episode (no KV cache: the tokens of a growing text need not
    extend the previous tokens). A conversation is read in the reward
    tokenizer's chat template when it has one.
    """

    def __init__(
        self, reward_model, reward_tokenizer, slots: Slots, conversations: list, config: TokenEnvConfig, turns: bool
    ):
        self.reward_model, self.reward_tokenizer, self.slots = reward_model, reward_tokenizer, slots
        self.conversations, self.score_clip = conversations, config.score_clip
        self.dense, self.per_turn = config.reward_mode == "dense", turns
        self.previous = torch.zeros(slots.num_slots, device=next(reward_model.parameters()).device)

    def text(self, row: int) -> str:
        """What the reward model reads, as text: the conversation and reply in its chat template when the prompt
        is a conversation and it has one, else the prompt text as given and the response."""
        messages = self.conversations[self.slots.prompt_index[row]]
        if messages is not None and self.reward_tokenizer.chat_template:
            reply = {"role": "assistant", "content": self.slots.response_text(row).strip()}
            return self.reward_tokenizer.apply_chat_template([*messages, reply], tokenize=False)
        return self.slots.prompt_text(row) + self.slots.response_text(row)

    def token_ids(self, row: int) -> list[int]:
        """``text(row)`` in the reward tokenizer's ids. Prompt and response are text (``textenv.text``): a control
        token's spelling in them is tokenized as its characters, while the tokenizer's own special tokens (BOS,
        [CLS]) and its chat template's tokens are added as it adds them."""
        messages = self.conversations[self.slots.prompt_index[row]]
        if messages is not None and self.reward_tokenizer.chat_template:
            return encode_chat(self.reward_tokenizer, messages, self.slots.response_text(row).strip())
        return encode_text(self.reward_tokenizer, self.slots.prompt_text(row) + self.slots.response_text(row))

    def scores(self, rows: Tensor) -> Tensor:
        """The reward model's score of each row's text, (K,)."""
        encoded = [self.token_ids(row) for row in rows.tolist()]
        pad = self.reward_tokenizer.pad_token_id if self.reward_tokenizer.pad_token_id is not None else 0
        ids, mask = (t.to(rows.device) for t in pad_batch(encoded, pad))
        return sequence_scores(self.reward_model, ids, mask)

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor) -> None:
        if self.dense:
            self.previous[rows] = clip_score(self.scores(rows), self.score_clip)

    def step(self, tokens: Tensor, live: Tensor, ended: Tensor, turn_ended: Tensor) -> tuple[Tensor, Tensor]:
        score = torch.full(ended.shape, float("nan"), device=ended.device)
        scored = ended if not self.dense else turn_ended if self.per_turn else live  # per turn: at each turn's end
        rows = scored.nonzero()[:, 0]
        if len(rows):
            score[rows] = self.scores(rows)
        if not self.dense:
            return score_terms(clip_score(torch.where(ended, score, 0.0), self.score_clip), ended), score
        current = torch.where(scored, clip_score(score, self.score_clip), self.previous)
        terms = score_terms(current, ended, previous=self.previous)
        self.previous = current
        return terms, nan_where_not(ended, score)


def build_scorer(task: Task, config: TokenEnvConfig, slots: Slots) -> Scorer:
    """The scorer of the task's reward model: by text with its own tokenizer, else by token ids, sparse or dense."""
    if task.reward_model is None:
        return NoModelScorer(slots.num_slots, next(task.reference_model.parameters()).device)
    turns = task.interaction is not None
    if task.reward_tokenizer is not None:
        conversations = task.conversations or [None] * len(task.prompts)
        return TextScorer(task.reward_model, task.reward_tokenizer, slots, conversations, config, turns)
    if config.reward_mode == "dense":
        return TurnScorer(task.reward_model, slots, config) if turns else DenseScorer(task.reward_model, slots, config)
    return SparseScorer(task.reward_model, slots, config)
