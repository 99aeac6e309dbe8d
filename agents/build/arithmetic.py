"""Build the arithmetic task from nothing: problems, tokenizer, SFT policy.

    python -m agents.build arithmetic --out DIR

writes into DIR:

    policy/                  tokenizer + GPT2LMHeadModel (the SFT policy, also the reference model)
    train.jsonl, eval.jsonl  the RL prompts and the held-out problems, {"prompt", "answer"} per line
    task.json                the BuildConfig used and the report measured after building

The shipped artifacts (``textenv/arithmetic/artifacts``) are this command's
output with the default config. The policy is trained by ``agents.sft``, with
the loss on the answer and EOS only (the operands are random, so predicting them
teaches nothing).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from agents.sft import Encoded, train_policy
from agents.supervised import FitConfig, gpt2_config
from textenv.arithmetic import load_rows
from textenv.arithmetic.data import BuildConfig, encode_sft, problem, sft_corpus, splits
from textenv.arithmetic.report import accuracy_report
from textenv.arithmetic.tokenizer import build_tokenizer

__all__ = ["BuildConfig", "build"]


def build(config: BuildConfig, out: Path, progress: bool = True, n_report_samples: int = 1000) -> dict:
    """Build every artifact of the task into ``out`` and return the report on its eval problems."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    train_pairs, eval_pairs, sft_pairs = splits(config)
    tokenizer = build_tokenizer()

    torch.manual_seed(config.seed)
    policy = GPT2LMHeadModel(gpt2_config(tokenizer, config.n_embd, config.n_layer, config.n_head, config.n_positions))
    ids, mask, labels = encode_sft(tokenizer, sft_corpus(sft_pairs, config))
    sft = FitConfig(steps=config.sft_steps, batch_size=config.sft_batch_size, learning_rate=config.sft_lr)
    train_policy(policy, Encoded(ids, mask, labels, prompt_ids=[]), sft, generator, progress)

    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(problem(a, b)) + "\n" for a, b in pairs))
    report = accuracy_report(policy, tokenizer, load_rows("eval", out), n_report_samples, seed=config.seed)
    (out / "task.json").write_text(json.dumps({"config": asdict(config), "report": report}, indent=2) + "\n")
    return report
