"""Build the review task (the default task) from nothing: corpus, tokenizer, SFT policy, reward model, prompts.

    python -m agents.build reviews --out DIR

writes into DIR:

    policy/          tokenizer + GPT2LMHeadModel (the SFT policy, also the reference model)
    reward_model/    tokenizer + GPT2ForSequenceClassification (one label)
    prompts_train.txt, prompts_eval.txt   review openings, one per line
    task.json        the BuildConfig used and the quality report measured after building

The shipped artifacts (``textenv/default_task/artifacts``) are this command's
output with the default config. The policy is trained by ``agents.sft`` and the
reward model by ``agents.reward_model`` (the Bradley-Terry loss, then calibrated:
neutral reviews score 0 on average, the corpus' scores have standard deviation 1, so
"scored positive" means score > 0), the same loop as their commands.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from agents.reward_model import Pairs, calibrate_reward_model, train_reward_model
from agents.sft import Encoded, train_policy
from agents.supervised import FitConfig, gpt2_config
from textenv.default_task.corpus import openings, preference_pairs, split
from textenv.default_task.data import BuildConfig, corpus_splits, encode
from textenv.default_task.report import quality_report
from textenv.default_task.tokenizer import build_tokenizer

__all__ = ["BuildConfig", "build"]


def build(config: BuildConfig, out: Path, progress: bool = True) -> dict:
    """Build every artifact of the task into ``out`` and return the quality report."""
    out = Path(out)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_reviews, _ = corpus_splits(config)
    prompts_train, prompts_eval = split(openings(), config.prompt_eval_fraction, config.seed)

    tokenizer = build_tokenizer([r.text for r in train_reviews] + openings(), config.vocab_size)

    torch.manual_seed(config.seed)
    policy = GPT2LMHeadModel(
        gpt2_config(tokenizer, config.policy_n_embd, config.policy_n_layer, config.policy_n_head, config.n_positions)
    )
    ids, mask = encode(tokenizer, [r.text for r in train_reviews], eos=True, side="right")
    sft = FitConfig(steps=config.sft_steps, batch_size=config.sft_batch_size, learning_rate=config.sft_lr)
    train_policy(policy, Encoded(ids, mask, labels=ids, prompt_ids=[]), sft, generator, progress)

    reward_model = GPT2ForSequenceClassification(
        gpt2_config(tokenizer, config.reward_n_embd, config.reward_n_layer, config.reward_n_head, config.n_positions)
    )
    pairs = preference_pairs(train_reviews, config.n_pairs, config.seed)
    # Half the texts end with <eos> and half do not, so the score does not depend on
    # whether a response stopped or was cut off.
    chosen = encode(tokenizer, [c for c, _ in pairs], [rng.random() < 0.5 for _ in pairs], side="right")
    rejected = encode(tokenizer, [r for _, r in pairs], [rng.random() < 0.5 for _ in pairs], side="right")
    fit = FitConfig(steps=config.reward_steps, batch_size=config.reward_batch_size, learning_rate=config.reward_lr)
    train_reward_model(reward_model, Pairs(chosen, rejected), fit, generator, progress)
    texts = [r.text for r in train_reviews]
    calibrate_reward_model(
        reward_model,
        neutral=encode(tokenizer, [r.text for r in train_reviews if r.sentiment == 0], eos=True, side="right"),
        everything=encode(tokenizer, texts, eos=True, side="right"),
    )

    for name, model in (("policy", policy), ("reward_model", reward_model)):
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    (out / "prompts_train.txt").write_text("\n".join(prompts_train) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(prompts_eval) + "\n")
    (out / "task.json").write_text(json.dumps({"config": asdict(config)}, indent=2) + "\n")

    report = quality_report(out, seed=config.seed, progress=progress)
    (out / "task.json").write_text(json.dumps({"config": asdict(config), "report": report}, indent=2) + "\n")
    return report
