"""The arithmetic task's problems: ``a+b=`` for a, b in 0..99, split three ways by a seeded shuffle.

All 10,000 ordered pairs (a, b) are shuffled once with the build seed and cut into
disjoint splits: ``eval`` (held out from everything), ``train`` (the RL prompts)
and the SFT pairs (the rest). No (a, b) pair is in two splits; (b, a) may be in
another split than (a, b), as it is a different prompt.

The SFT corpus repeats each SFT pair a few times and, with probability
``corrupt_prob`` per copy, writes a wrong answer off by one or by ten. A policy
that learns this corpus answers right with probability about ``1 - corrupt_prob``
when sampled, while its most likely answer stays the right one: exactly the
kind of policy that RL with an exact-match reward can sharpen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from textenv.lm import pad_batch

MAX_OPERAND = 99
CORRUPTIONS = (-10, -1, 1, 10)


@dataclass
class BuildConfig:
    """How the arithmetic task is built. The defaults make the shipped artifacts."""

    seed: int = 0
    """Seed of the splits, the corpus' corruptions, the model initialisation and the training batches."""
    n_eval: int = 200
    """Held-out problems (``eval.jsonl``), in no other split."""
    n_train: int = 2000
    """RL prompts (``train.jsonl``); the remaining pairs are the SFT pairs."""
    sft_copies: int = 4
    """Copies of each SFT pair in the SFT corpus, each corrupted independently."""
    corrupt_prob: float = 0.6
    """Chance that a copy's answer is replaced by a wrong one (off by -10, -1, +1 or +10)."""
    n_positions: int = 64
    """Context length of the policy (the longest prompt + answer + EOS is 10 tokens)."""
    n_embd: int = 64
    """Width of the policy's GPT-2."""
    n_layer: int = 2
    """Transformer blocks of the policy."""
    n_head: int = 4
    """Attention heads of the policy."""
    sft_steps: int = 3000
    """Optimizer steps of supervised fine-tuning."""
    sft_batch_size: int = 128
    """Corpus rows per SFT step."""
    sft_lr: float = 3e-3
    """Peak learning rate of SFT (AdamW, warm-up then cosine decay)."""


def problem(a: int, b: int) -> dict:
    """The row of ``a + b``: prompt and answer as strings."""
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def splits(config: BuildConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """The disjoint (train, eval, sft) lists of (a, b) pairs of ``config``; the same at build and report time."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(config.seed).shuffle(pairs)
    if config.n_eval + config.n_train >= len(pairs):
        raise ValueError(f"n_eval + n_train must leave SFT pairs out of {len(pairs)}")
    held_out, train = pairs[: config.n_eval], pairs[config.n_eval : config.n_eval + config.n_train]
    return train, held_out, pairs[config.n_eval + config.n_train :]


def corrupt(answer: int, rng: random.Random) -> int:
    """A wrong answer near ``answer``: off by one or by ten, never negative."""
    delta = rng.choice(CORRUPTIONS)
    return answer + delta if answer + delta >= 0 else answer - delta


def sft_corpus(pairs: list[tuple[int, int]], config: BuildConfig) -> list[tuple[str, str]]:
    """(prompt, answer) rows of the SFT corpus: ``sft_copies`` per pair, a ``corrupt_prob`` share of them wrong."""
    rng = random.Random(config.seed + 1)
    rows = []
    for a, b in pairs:
        for _ in range(config.sft_copies):
            answer = corrupt(a + b, rng) if rng.random() < config.corrupt_prob else a + b
            rows.append((f"{a}+{b}=", str(answer)))
    return rows


def encode_sft(tokenizer: PreTrainedTokenizerBase, rows: list[tuple[str, str]]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prompt + answer + <eos>`` ids, their mask, and labels that are -100 on prompt and padding."""
    prompts = tokenizer([p for p, _ in rows])["input_ids"]
    answers = tokenizer([a for _, a in rows])["input_ids"]
    ids, mask = pad_batch(
        [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)], tokenizer.pad_token_id, side="right"
    )
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    on_prompt = torch.arange(ids.shape[1]) < prompt_lengths[:, None]  # (N, T)
    return ids, mask, ids.masked_fill(on_prompt | (mask == 0), -100)
