"""What both the build and the report derive from a ``BuildConfig``: the corpus splits and the encoded texts.

``build`` makes the task from these and then calls ``report``, which measures it
on the same held-out reviews: both import this module, so ``report`` needs
nothing from ``build``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from textenv.default_task.corpus import Review, generate_corpus, split
from textenv.lm import pad_batch


@dataclass
class BuildConfig:
    """How the default task is built. The defaults make the shipped artifacts."""

    seed: int = 0
    """Seed of the corpus, the splits, the model initialisation and the training batches."""
    n_reviews: int = 6000
    """Distinct reviews in the corpus (a third each negative, neutral, positive)."""
    eval_fraction: float = 0.1
    """Share of reviews held out from training (held-out preference pairs come from them)."""
    n_pairs: int = 20000
    """Preference pairs drawn from the training reviews for the reward model."""
    prompt_eval_fraction: float = 0.2
    """Share of the review openings kept as eval prompts."""
    vocab_size: int = 1024
    """Upper bound on the BPE vocabulary (the corpus needs fewer; training stops early)."""
    n_positions: int = 128
    """Context length of both models (prompt + response must fit)."""
    policy_n_embd: int = 128
    """Width of the policy's GPT-2."""
    policy_n_layer: int = 2
    """Transformer blocks of the policy."""
    policy_n_head: int = 4
    """Attention heads of the policy."""
    reward_n_embd: int = 64
    """Width of the reward model's GPT-2."""
    reward_n_layer: int = 2
    """Transformer blocks of the reward model."""
    reward_n_head: int = 4
    """Attention heads of the reward model."""
    sft_steps: int = 1500
    """Optimizer steps of supervised fine-tuning."""
    sft_batch_size: int = 64
    """Reviews per SFT step."""
    sft_lr: float = 2e-3
    """Peak learning rate of SFT (AdamW, warm-up then cosine decay)."""
    reward_steps: int = 800
    """Optimizer steps of reward-model training."""
    reward_batch_size: int = 64
    """Preference pairs per reward-model step."""
    reward_lr: float = 1e-3
    """Peak learning rate of reward-model training."""


def corpus_splits(config: BuildConfig) -> tuple[list[Review], list[Review]]:
    """The (train, eval) reviews of ``config``; the same lists at build and at report time."""
    return split(generate_corpus(config.n_reviews, config.seed), config.eval_fraction, config.seed)


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], eos: list[bool] | bool, side: str):
    """Token ids of ``texts`` (with ``<eos>`` appended where ``eos``), padded into (ids, mask)."""
    eos = [eos] * len(texts) if isinstance(eos, bool) else eos
    rows = [ids + [tokenizer.eos_token_id] * add for ids, add in zip(tokenizer(texts)["input_ids"], eos)]
    return pad_batch(rows, tokenizer.pad_token_id, side=side)
