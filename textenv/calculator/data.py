"""The calculator task's tokenizer and SFT corpus: transcripts that answer directly or call the tool and copy.

A transcript is a list of ``(speaker, text)`` segments, speaker ``prompt``,
``agent`` or ``env``; every agent segment is a turn and ends with EOS when
encoded. The two shapes::

    [("prompt", "17+25="), ("agent", "42")]                                   17+25=42<eos>
    [("prompt", "17+25="), ("agent", "?"), ("env", "42:"), ("agent", "42")]  17+25=?<eos>42:42<eos>

A ``p_tool`` share of the corpus calls the tool and copies the result; the rest
answers directly, a ``corrupt_prob`` share of those off by one or by ten (the
arithmetic task's corruption). The loss is on the agent's tokens only: the
operands are random and the calculator's reply is the environment's, so
predicting either teaches the policy nothing it should act on.

The problems are the arithmetic task's SFT pairs, split with the arithmetic
build's default config (the split behind the shipped ``train.jsonl`` and
``eval.jsonl`` that ``load_rows`` reads), so no RL or held-out prompt is in the corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from torch import Tensor
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from textenv.arithmetic.data import BuildConfig as ArithmeticBuildConfig
from textenv.arithmetic.data import corrupt, splits
from textenv.arithmetic.tokenizer import CHARACTERS
from textenv.arithmetic.tokenizer import build_tokenizer as build_character_tokenizer
from textenv.calculator import CALL, SEPARATOR, result_text
from textenv.lm import pad_batch

Transcript = list[tuple[str, str]]


@dataclass
class BuildConfig:
    """How the calculator task's policy is built. The defaults make the shipped artifacts."""

    seed: int = 0
    """Seed of the corpus' draws, the model initialisation and the training batches."""
    sft_copies: int = 4
    """Transcripts per SFT pair, each drawn independently."""
    p_tool: float = 0.25
    """Share of transcripts that call the calculator and copy its result."""
    corrupt_prob: float = 0.6
    """Chance that a direct answer is replaced by a wrong one (off by -10, -1, +1 or +10)."""
    n_positions: int = 256
    """Context length of the policy (room for the env's observation window of several turns)."""
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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The arithmetic task's character tokenizer plus ``CALL`` and ``SEPARATOR`` (ids 15 and 16)."""
    return build_character_tokenizer(CHARACTERS + CALL + SEPARATOR)


def sft_pairs() -> list[tuple[int, int]]:
    """The (a, b) pairs of the corpus: the arithmetic task's SFT pairs, disjoint from ``load_rows``' splits."""
    return splits(ArithmeticBuildConfig())[2]


def transcript(a: int, b: int, answer: int, tool: bool) -> Transcript:
    """The segments of ``a+b=`` answered ``answer`` directly, or, with ``tool``, after calling the calculator."""
    prompt = f"{a}+{b}="
    if tool:
        return [("prompt", prompt), ("agent", CALL), ("env", result_text(prompt)), ("agent", str(answer))]
    return [("prompt", prompt), ("agent", str(answer))]


def sft_corpus(pairs: list[tuple[int, int]], config: BuildConfig) -> list[Transcript]:
    """``sft_copies`` transcripts per pair: a ``p_tool`` share call and copy, the rest answer with noise."""
    rng = random.Random(config.seed + 1)
    rows = []
    for a, b in pairs:
        for _ in range(config.sft_copies):
            if rng.random() < config.p_tool:
                rows.append(transcript(a, b, a + b, tool=True))
            else:
                answer = corrupt(a + b, rng) if rng.random() < config.corrupt_prob else a + b
                rows.append(transcript(a, b, answer, tool=False))
    return rows


def encode_transcripts(tokenizer: PreTrainedTokenizerBase, rows: list[Transcript]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids of each transcript (agent turns + ``<eos>``), its mask, and labels on agent tokens only."""
    sequences, on_agent = [], []
    for segments in rows:
        ids, agent = [], []
        for speaker, text in segments:
            piece = tokenizer(text)["input_ids"] + ([tokenizer.eos_token_id] if speaker == "agent" else [])
            ids += piece
            agent += [speaker == "agent"] * len(piece)
        sequences.append(ids)
        on_agent.append(agent)
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, side="right")  # (N, T)
    agent_mask, _ = pad_batch([[int(x) for x in a] for a in on_agent], 0, side="right")
    return ids, mask, ids.masked_fill(agent_mask == 0, -100)
