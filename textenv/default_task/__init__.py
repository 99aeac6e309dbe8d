"""The embedded default task: a miniature of "make a language model write positive movie reviews".

It ships with the package and loads offline with plain ``from_pretrained``::

    from transformers import AutoModelForCausalLM
    from textenv.default_task import POLICY_DIR
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR)

Rebuild it with ``python -m agents.build reviews --out DIR`` (the learner side trains it) and
inspect it with ``python -m textenv.default_task report``.
"""

from __future__ import annotations

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
POLICY_DIR = ARTIFACTS_DIR / "policy"
REWARD_MODEL_DIR = ARTIFACTS_DIR / "reward_model"


def load_prompts(split: str = "train", task_dir: Path = ARTIFACTS_DIR) -> list[str]:
    """The review openings of ``split`` ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return (Path(task_dir) / f"prompts_{split}.txt").read_text().split("\n")[:-1]


__all__ = ["ARTIFACTS_DIR", "POLICY_DIR", "REWARD_MODEL_DIR", "load_prompts"]
