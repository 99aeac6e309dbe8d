"""The embedded arithmetic task: answer ``a+b=`` (a, b in 0..99) with the sum's digits, rewarded by exact match.

A prompt is ``17+25=``, the right response ``42<eos>``, one token per character.
The reward is verifiable, so no reward model: ``exact_match`` is 1.0 for the right
answer and 0.0 otherwise. The SFT policy ships with the package and loads offline
with plain ``from_pretrained``::

    from transformers import AutoModelForCausalLM
    from textenv.arithmetic import POLICY_DIR, load_rows
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    rows = load_rows("train")  # [{"prompt": "17+25=", "answer": "42"}, ...]

It was trained on a corpus where 60% of the answers are off by one or by ten, so
it knows the sum (its greedy answer is almost always right) but often samples a
wrong one: room for RL. ``python -m textenv.arithmetic report`` (1000 samples at
temperature 1 over the 200 held-out prompts, seed 0) measures the shipped policy:

    accuracy/sampled   0.455    accuracy/greedy    0.990
    policy/eos_rate    1.000    policy/shape_rate  1.000

In a check made while choosing the build, a minimal GRPO loop (32 train prompts x
8 samples per update, one gradient step each, lr 3e-4, no KL) raised the held-out
sampled accuracy to 0.955 in 150 s on one CPU thread.

Rebuild it with ``python -m agents.build arithmetic --out DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
POLICY_DIR = ARTIFACTS_DIR / "policy"

# The task's episode limits: its preset (``textenv.tasks``) gives them to the env, the trainer and the evaluator.
MAX_PROMPT_TOKENS = 8
"""Prompt budget: the longest prompt, ``99+99=``, is 6 tokens."""
MAX_NEW_TOKENS = 32
"""Response budget: the review task's 32, though the longest answer, ``198<eos>``, is 4 tokens: a policy that
wanders has room to show it (``eos_rate``), as in the training runs the README reports."""


def load_rows(split: str = "train", task_dir: Path = ARTIFACTS_DIR) -> list[dict]:
    """The problems of ``split`` ("train": the RL prompts, or "eval": held out), as ``{"prompt", "answer"}`` dicts."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    lines = (Path(task_dir) / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def exact_match(prompt: str, response: str, response_ids: list[int], row: dict) -> float:
    """1.0 when the decoded ``response`` (special tokens skipped), stripped, is ``row["answer"]``; else 0.0.

    ``prompt`` and ``response_ids`` are unused: they are there so that every reward
    function of a task is called the same way.
    """
    return float(response.strip() == row["answer"])


__all__ = ["ARTIFACTS_DIR", "MAX_NEW_TOKENS", "MAX_PROMPT_TOKENS", "POLICY_DIR", "exact_match", "load_rows"]
