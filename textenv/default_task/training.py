"""Supervised training of the default task's two models: the SFT policy and the reward model.

Both are tiny GPT-2s trained from scratch on the synthetic review corpus:

- the policy by next-token prediction on ``review + <eos>`` (this model is also
  the reference model of RLHF);
- the reward model by the Bradley-Terry loss on preference pairs,
  ``-log sigmoid(r(chosen) - r(rejected))`` (Christiano et al. 2017; Ouyang et
  al. 2022, eq. 1), its score read at the last real token.

The Bradley-Terry loss fixes only score *differences*. After training, the reward
model is calibrated so that neutral reviews score 0 on average and the corpus'
scores have standard deviation 1 (PPO works best with a score of stable scale;
see "The N Implementation Details of RLHF with PPO"): "scored positive" then
simply means score > 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerBase

from textenv.lm import sequence_scores, sequence_scores_with_grad


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Mean negative log-likelihood that each chosen response beats its rejected one."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def gpt2_config(
    tokenizer: PreTrainedTokenizerBase, n_embd: int, n_layer: int, n_head: int, n_positions: int
) -> GPT2Config:
    """A GPT-2 config for ``tokenizer`` with dropout off everywhere (RLHF needs deterministic forwards)."""
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )


def _optimizer(
    model: torch.nn.Module, lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_policy(
    model: GPT2LMHeadModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool = True,
    labels: Tensor | None = None,
) -> list[float]:
    """Next-token prediction on right-padded ``review + <eos>`` rows. Returns the loss per step.

    ``labels`` (default: ``input_ids``) is -100 at positions without loss; padding never has a loss.
    """
    labels = (input_ids if labels is None else labels).masked_fill(attention_mask == 0, -100)
    optimizer, scheduler = _optimizer(model, lr, steps)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="SFT policy", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(input_ids), (batch_size,), generator=generator)
        loss = model(input_ids=input_ids[rows], attention_mask=attention_mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def train_reward_model(
    model: GPT2ForSequenceClassification,
    chosen: tuple[Tensor, Tensor],
    rejected: tuple[Tensor, Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    progress: bool = True,
) -> list[float]:
    """Bradley-Terry training on aligned (ids, mask) batches of chosen and rejected texts."""
    optimizer, scheduler = _optimizer(model, lr, steps)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="reward model", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, len(chosen[0]), (batch_size,), generator=generator)
        ids = torch.cat([chosen[0][rows], rejected[0][rows]])
        mask = torch.cat([chosen[1][rows], rejected[1][rows]])
        scores = sequence_scores_with_grad(model, ids, mask)
        loss = bradley_terry_loss(scores[:batch_size], scores[batch_size:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def calibrate_reward_model(
    model: GPT2ForSequenceClassification, neutral: tuple[Tensor, Tensor], everything: tuple[Tensor, Tensor]
) -> tuple[float, float]:
    """Shift and scale the scores in the weights: neutral texts to mean 0, all texts to std 1.

    GPT-2's score head has no bias, so the shift goes into the final layer norm's
    bias: adding ``c * w / |w|^2`` there adds exactly ``c`` to ``w . h`` for every
    input. The model stays a plain ``GPT2ForSequenceClassification``.
    Returns the (shift, scale) applied.
    """
    scale = 1.0 / sequence_scores(model, *everything).std().item()
    model.score.weight.mul_(scale)
    shift = -sequence_scores(model, *neutral).mean().item()
    w = model.score.weight[0]
    model.transformer.ln_f.bias.add_(shift * w / w.dot(w))
    return shift, scale
