"""The arithmetic task's report: how often does the SFT policy answer the held-out problems right?

    python -m textenv.arithmetic report [--samples N]

samples the policy on the eval prompts (temperature 1, stopping at EOS, at most
``max_new_tokens``) and decodes greedily once per prompt, then measures:

- ``accuracy/sampled`` and ``accuracy/greedy``: exact-match accuracy (the task's reward);
- ``policy/eos_rate``: share of samples that ended with EOS;
- ``policy/shape_rate``: share of samples that are a number (1 to 3 digits, no leading zero) then EOS.

The decoding loop is a plain full forward per token (no KV cache: a sequence is
at most 14 tokens), so it checks the saved model independently of the env's
cached stepping, and it also decodes greedily, which ``textenv.lm.sample`` does not.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from textenv.arithmetic import exact_match
from textenv.default_task.report import figure_lines
from textenv.lm import pad_batch, position_ids_from_mask, sample_tokens

NUMBER = re.compile(r"0|[1-9][0-9]{0,2}")


@torch.no_grad()
def generate(
    policy: torch.nn.Module,
    prompt_ids: list[list[int]],
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """(response ids up to and including EOS, ended with EOS) per prompt; ``temperature=None`` decodes greedily."""
    ids, mask = pad_batch(prompt_ids, pad_token_id, side="left")  # (B, P)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    tokens = []
    for _ in range(max_new_tokens):
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        if temperature is None:
            token = logits.argmax(-1)  # (B,)
        else:
            token, _ = sample_tokens(logits, temperature, generator)  # (B,)
        token = token.masked_fill(done, pad_token_id)  # rows that ended only pad
        tokens.append(token)
        done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, (~done | (token == eos_token_id)).long()[:, None]], dim=1)
        if done.all():
            break
    responses, ended = [], []
    for row in torch.stack(tokens, dim=1).tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        responses.append(row)
        ended.append(row[-1] == eos_token_id)
    return responses, ended


def accuracy_report(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    n_samples: int = 1000,
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """The figures of the module docstring, over ``n_samples`` samples cycling through ``rows``. A flat dict."""
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    sampled_rows = [rows[i % len(rows)] for i in range(n_samples)]
    prompt_ids = tokenizer([r["prompt"] for r in sampled_rows])["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses, ended = generate(policy, prompt_ids, eos, pad, max_new_tokens, 1.0, generator)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    greedy, _ = generate(policy, tokenizer([r["prompt"] for r in rows])["input_ids"], eos, pad, max_new_tokens, None)

    def accuracy(problems: list[dict], responses: list[list[int]]) -> float:
        decoded = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards = [
            exact_match(prompt=r["prompt"], response=t, response_ids=ids, row=r)
            for r, t, ids in zip(problems, decoded, responses)
        ]
        return float(np.mean(rewards))

    return {
        "accuracy/sampled": accuracy(sampled_rows, responses),
        "accuracy/greedy": accuracy(rows, greedy),
        "policy/eos_rate": float(np.mean(ended)),
        "policy/shape_rate": float(np.mean([e and NUMBER.fullmatch(t) is not None for t, e in zip(texts, ended)])),
        "policy/n_samples": n_samples,
        "policy/n_prompts": len(rows),
        "samples": [
            {"prompt": r["prompt"], "response": t, "answer": r["answer"], "ended_with_eos": e}
            for r, t, e in list(zip(sampled_rows, texts, ended))[:10]
        ],
    }


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    lines = ["Samples (eval prompts, temperature 1):"]
    for s in report["samples"]:
        mark = "right" if s["response"] == s["answer"] else f"wrong (answer {s['answer']})"
        lines.append(f"  {s['prompt']}{s['response']}{'' if s['ended_with_eos'] else ' [no EOS]'}  {mark}")
    lines.append("")
    return "\n".join(lines + figure_lines(report))
