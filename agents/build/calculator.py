"""Build the calculator task's SFT policy from nothing: tokenizer, corpus, training.

    python -m agents.build calculator --out DIR

writes into DIR:

    policy/     tokenizer + GPT2LMHeadModel (the SFT policy, also the reference model)
    task.json   the BuildConfig used and the report measured after building

The problems are not written: they are the arithmetic task's (``load_rows``).
The shipped artifacts (``textenv/calculator/artifacts``) are this command's
output with the default config. The policy is trained by ``agents.sft``, with
the loss on the agent's turns only (see ``textenv.calculator.data``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from agents.sft import Encoded, train_policy
from agents.supervised import FitConfig, gpt2_config
from textenv.calculator import load_rows
from textenv.calculator.data import BuildConfig, build_tokenizer, encode_transcripts, sft_corpus, sft_pairs
from textenv.calculator.report import calculator_report

__all__ = ["BuildConfig", "build"]


def build(config: BuildConfig, out: Path, progress: bool = True, n_report_samples: int = 1000) -> dict:
    """Build the task's tokenizer and policy into ``out`` and return the report on the eval problems."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = build_tokenizer()

    torch.manual_seed(config.seed)
    policy = GPT2LMHeadModel(gpt2_config(tokenizer, config.n_embd, config.n_layer, config.n_head, config.n_positions))
    ids, mask, labels = encode_transcripts(tokenizer, sft_corpus(sft_pairs(), config))
    sft = FitConfig(steps=config.sft_steps, batch_size=config.sft_batch_size, learning_rate=config.sft_lr)
    train_policy(policy, Encoded(ids, mask, labels, prompt_ids=[]), sft, generator, progress)

    policy.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    report = calculator_report(policy, tokenizer, load_rows("eval"), n_report_samples, seed=config.seed)
    (out / "task.json").write_text(json.dumps({"config": asdict(config), "report": report}, indent=2) + "\n")
    return report
