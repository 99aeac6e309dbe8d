"""The default task's quality report: is the SFT policy a good starting point, is the reward model right?

    python -m textenv.default_task report [--task-dir DIR]

measures, on the eval prompts and held-out reviews:

- the reward model's pairwise accuracy on held-out preference pairs;
- the policy's samples: how many end with EOS within ``max_new_tokens``, how many
  are well-formed reviews of the corpus grammar, and sample texts with scores;
- the score distribution of those samples (mean, std, fraction scored positive),
  and how often the score's sign agrees with the lexicon's ground truth.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from textenv.default_task.corpus import is_well_formed, lexicon_sentiment, preference_pairs
from textenv.default_task.data import BuildConfig, corpus_splits, encode
from textenv.lm import pad_batch, sample, sequence_scores


def _batched_scores(reward_model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 256) -> np.ndarray:
    scores = [
        sequence_scores(reward_model, *pad_batch(sequences[i : i + batch_size], pad_token_id))
        for i in range(0, len(sequences), batch_size)
    ]
    return torch.cat(scores).numpy()


def _load_models(task_dir: Path):
    """(tokenizer, policy, reward_model, seconds it took) of a built task, both models in eval mode."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(task_dir / "policy")
    policy = AutoModelForCausalLM.from_pretrained(task_dir / "policy").eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(task_dir / "reward_model").eval()
    return tokenizer, policy, reward_model, time.perf_counter() - start


def pairwise_accuracy(reward_model, tokenizer, config: BuildConfig, n_pairs: int, seed: int) -> float:
    """How often the reward model scores the chosen review of a held-out preference pair above the rejected one."""
    _, eval_reviews = corpus_splits(config)
    pairs = preference_pairs(eval_reviews, n_pairs, seed)
    chosen = encode(tokenizer, [c for c, _ in pairs], eos=True, side="left")
    rejected = encode(tokenizer, [r for _, r in pairs], eos=True, side="left")
    return float((sequence_scores(reward_model, *chosen) > sequence_scores(reward_model, *rejected)).float().mean())


def sample_responses(
    policy, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, progress: bool, batch_size: int = 128
) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """(prompt ids, response ids, ended with EOS) of one sample per prompt at temperature 1, in batches."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = tokenizer(prompts)["input_ids"]
    responses, ended = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        batch = sample(
            policy,
            prompt_ids[i : i + batch_size],
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            max_new_tokens,
            1.0,
            generator,
        )
        responses += batch.response_ids
        ended += batch.ended_with_eos
    return prompt_ids, responses, ended


def sample_statistics(texts: list[str], responses: list[list[int]], ended: list[bool], scores: np.ndarray) -> dict:
    """The figures of the policy's samples and of their scores: the ``policy/*`` and ``score/*`` entries."""
    return {
        "policy/n_samples": len(texts),
        "policy/eos_rate": float(np.mean(ended)),
        "policy/well_formed_rate": float(np.mean([is_well_formed(t) for t in texts])),
        "policy/mean_response_tokens": float(np.mean([len(r) for r in responses])),
        "score/mean": float(scores.mean()),
        "score/std": float(scores.std()),
        "score/frac_positive": float(np.mean(scores > 0)),
    }


def sign_agreement(texts: list[str], scores: np.ndarray) -> float:
    """How often the score's sign agrees with the lexicon's ground truth, over the texts that are not neutral."""
    truth = np.array([lexicon_sentiment(t) for t in texts])
    opinionated = truth != 0
    return float(np.mean((scores[opinionated] > 0) == (truth[opinionated] > 0)))


def quality_report(
    task_dir: Path,
    n_samples: int = 512,
    max_new_tokens: int = 32,
    n_eval_pairs: int = 2000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Measure the task in ``task_dir`` (a ``build`` output). Returns a flat dict of figures."""
    task_dir = Path(task_dir)
    config = BuildConfig(**json.loads((task_dir / "task.json").read_text())["config"])
    tokenizer, policy, reward_model, load_seconds = _load_models(task_dir)
    accuracy = pairwise_accuracy(reward_model, tokenizer, config, n_eval_pairs, seed + 1)

    prompts = (task_dir / "prompts_eval.txt").read_text().split("\n")[:-1]
    prompts = [prompts[i % len(prompts)] for i in range(n_samples)]
    prompt_ids, responses, ended = sample_responses(policy, tokenizer, prompts, max_new_tokens, seed, progress)
    scores = _batched_scores(reward_model, [p + r for p, r in zip(prompt_ids, responses)], tokenizer.pad_token_id)
    texts = [
        prompt + " " + tokenizer.decode(response, skip_special_tokens=True)
        for prompt, response in zip(prompts, responses)
    ]
    return {
        "load_seconds": load_seconds,
        "reward_model/pairwise_accuracy": accuracy,
        "reward_model/n_eval_pairs": n_eval_pairs,
        "reward_model/sign_agreement_on_samples": sign_agreement(texts, scores),
        **sample_statistics(texts, responses, ended, scores),
        "samples": [
            {"text": t, "score": round(float(s), 3), "ended_with_eos": e}
            for t, s, e in list(zip(texts, scores, ended))[:10]
        ],
    }


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    lines = ["Sample generations (eval prompts, temperature 1):"]
    for s in report["samples"]:
        lines.append(f"  {s['score']:+6.2f}  {s['text']}{'' if s['ended_with_eos'] else '  [no EOS]'}")
    lines.append("")
    return "\n".join(lines + figure_lines(report))


def figure_lines(report: dict) -> list[str]:
    """A report's figures (every key but ``samples``), one aligned line each; the tasks' reports share it."""
    width = max(len(k) for k in report if k != "samples")
    return [
        f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
        for key, value in report.items()
        if key != "samples"
    ]
