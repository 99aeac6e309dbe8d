"""Step 2 of RLHF, the reward model: learn to score a response so that preferred ones score higher.

    python -m agents.reward_model --data preferences.jsonl --run-dir runs/rm [--model runs/sft/final | scratch]

A preference is a row with a ``prompt``, a ``chosen`` and a ``rejected`` response
(names set by ``--prompt-column``, ``--chosen-column``, ``--rejected-column``), or
without a prompt, two chat conversations (``chosen`` and ``rejected``) that differ in
their last, assistant message. The reward model reads the prompt and a response as the
env lays them out (``textenv.loading.tokenize_prompts``, then the response's text) and
gives one score, read at the last real token; training minimises the Bradley-Terry
loss ``-log sigmoid(r(chosen) - r(rejected))`` (Christiano et al. 2017; Ouyang et al.
2022, eq. 1). By default it starts from the SFT policy of step 1 with a new one-output
head, as DeepSpeed-Chat does.

The loss fixes only score differences. ``--calibrate`` (on by default) then shifts and
scales the scores inside the weights so that the training responses score mean 0 and
standard deviation 1 (the embedded review task does the same): the env's ``score_clip``
(5) and KL coefficient then act on a known scale. The calibration's effect is logged.
``final/`` is a sequence classifier with one label that the env takes as
``reward_model=`` with no conversion.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from agents.logger import write_atomically
from agents.lora import add_lora
from agents.supervised import (
    Evaluation,
    FitConfig,
    ModelSource,
    RowsSource,
    RunDirConfig,
    SupervisedLoop,
    command_line,
    fit_to_length,
    gpt2_config,
    save_final,
    set_threads,
    start_run,
    text_field,
)
from agents.train import TrainingStopped
from textenv.config import AsPath
from textenv.lm import disable_dropout, pad_batch, sequence_scores, sequence_scores_with_grad
from textenv.loading import check_reward_model_config, load_config, load_pretrained, model_positions, tokenize_prompts
from textenv.text import encode_text

CURVES = (("loss/train", "eval/loss", "Bradley-Terry loss"), ("eval/accuracy", None, "held-out pairwise accuracy"))


@dataclass
class PreferenceData(RowsSource):
    """The preference pairs, their fields, and the held-out share; rows without a prompt hold two conversations."""

    data: Annotated[str, AsPath] = "preferences.jsonl"
    """JSON lines (or .json), or a saved datasets directory: rows with a prompt, a chosen and a rejected response."""
    chosen_column: str = "chosen"
    """The preferred response (a string), or the preferred conversation."""
    rejected_column: str = "rejected"
    """The other response, or conversation."""
    eos: Literal["half", "always", "never"] = "half"
    """Whether a response is scored with EOS after it: 'half' of the texts at random (the score then does not
    depend on whether a response stopped or was cut off), every one, or none."""


@dataclass
class RewardModelConfig:
    data: PreferenceData = field(default_factory=PreferenceData)
    model: ModelSource = field(default_factory=lambda: ModelSource(model="runs/sft/final"))
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=300, learning_rate=5e-4))
    run: RunDirConfig = field(default_factory=lambda: RunDirConfig(run_dir=Path("runs/rm")))
    calibrate: bool = True
    """After training, shift and scale the scores in the weights: training responses to mean 0, std 1."""

    def validate(self) -> None:
        for part in (self.data, self.model, self.fit, self.run):
            part.validate()


@dataclass
class Pairs:
    """Chosen and rejected texts as (ids, mask) pairs of tensors, row i of each a pair."""

    chosen: tuple[Tensor, Tensor]
    rejected: tuple[Tensor, Tensor]

    def __len__(self) -> int:
        return len(self.chosen[0])


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Mean negative log-likelihood that each chosen response beats its rejected one."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


# ---------------------------------------------------------------- preferences to tokens


def encode_preferences(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, data: PreferenceData, max_length: int, seed: int, what: str
) -> Pairs:
    """The pairs as the env lays texts out: prompt ids, then each response's text (and EOS, per ``data.eos``)."""
    prompts, chosen, rejected = preference_texts(rows, data, what)
    _, prompt_ids = tokenize_prompts(prompts, tokenizer, 10**9, "error", chat_template=data.chat_template)
    rng = random.Random(seed)
    sequences = []
    for texts in (chosen, rejected):
        eos = [data.eos == "always" or (data.eos == "half" and rng.random() < 0.5) for _ in texts]
        sequences += [
            prompt + encode_text(tokenizer, text, add_special_tokens=False) + [tokenizer.eos_token_id] * add
            for prompt, text, add in zip(prompt_ids, texts, eos)
        ]
    fit_to_length(sequences, max_length, data.truncate, what)
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, side="right")  # one width: a batch stacks both sides
    n = len(chosen)
    return Pairs((ids[:n], mask[:n]), (ids[n:], mask[n:]))


def preference_texts(rows: list[dict], data: PreferenceData, what: str) -> tuple[list, list[str], list[str]]:
    """(prompts, chosen, rejected) of the rows; a pair whose two responses are equal teaches nothing and is
    refused, as is an empty response."""
    prompts, chosen, rejected = [], [], []
    for number, row in enumerate(rows):
        if data.prompt_column in row:
            prompt = row[data.prompt_column]
            good = text_field(row, data.chosen_column, number, what)
            bad = text_field(row, data.rejected_column, number, what)
        else:
            prompt, good, bad = split_conversations(row, data, number, what)
        if good == bad:
            raise ValueError(
                f"{what} row {number}: chosen and rejected are the same text, so neither is preferred; remove the row"
            )
        prompts.append(prompt)
        chosen.append(good)
        rejected.append(bad)
    return prompts, chosen, rejected


def split_conversations(row: dict, data: PreferenceData, number: int, what: str) -> tuple[list, str, str]:
    """A chat pair: two conversations with the same turns before a last, assistant message."""
    pair = [row.get(data.chosen_column), row.get(data.rejected_column)]
    if not all(isinstance(c, list) and c and isinstance(c[-1], dict) for c in pair):
        raise ValueError(
            f"{what} row {number} has no {data.prompt_column!r} field and no chat pair ({data.chosen_column!r} and "
            f"{data.rejected_column!r} as conversations); name the fields with --prompt-column, --chosen-column, "
            "--rejected-column"
        )
    if any(c[-1].get("role") != "assistant" for c in pair) or pair[0][:-1] != pair[1][:-1] or len(pair[0]) < 2:
        raise ValueError(
            f"{what} row {number}: a chat pair must share every message but the last, which is the assistant's"
        )
    replies = [c[-1].get("content") for c in pair]
    if not all(isinstance(r, str) and r.strip() for r in replies):
        raise ValueError(f"{what} row {number}: an assistant reply is empty or not a string")
    return pair[0][:-1], replies[0], replies[1]


# ---------------------------------------------------------------- the loss, the evaluation, the calibration


def pair_loss(pairs: Pairs, device: torch.device):
    """``loss(model, rows)``: the Bradley-Terry loss of the pairs at ``rows``, both sides in one forward."""

    def loss(model: nn.Module, rows: Tensor) -> Tensor:
        ids = torch.cat([pairs.chosen[0][rows], pairs.rejected[0][rows]]).to(device)
        mask = torch.cat([pairs.chosen[1][rows], pairs.rejected[1][rows]]).to(device)
        scores = sequence_scores_with_grad(model, ids, mask)
        return bradley_terry_loss(scores[: len(rows)], scores[len(rows) :])

    return loss


@torch.no_grad()
def scores_of(
    model: nn.Module, texts: tuple[Tensor, Tensor], device: torch.device, batch_size: int | None = 128
) -> Tensor:
    """The score of every text, in batches (``None``: all in one)."""
    ids, mask = texts
    batch_size = batch_size or len(ids)
    parts = [
        sequence_scores(model, ids[i : i + batch_size].to(device), mask[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(ids), batch_size)
    ]
    return torch.cat(parts)


def pair_metrics(model: nn.Module, pairs: Pairs, device: torch.device, prefix: str = "eval") -> dict[str, float]:
    """Pairwise accuracy, loss, margin and score statistics of ``pairs``."""
    chosen, rejected = scores_of(model, pairs.chosen, device), scores_of(model, pairs.rejected, device)
    both = torch.cat([chosen, rejected])
    return {
        f"{prefix}/accuracy": float((chosen > rejected).float().mean()),
        f"{prefix}/loss": float(bradley_terry_loss(chosen, rejected)),
        f"{prefix}/margin": float((chosen - rejected).mean()),
        f"{prefix}/chosen_score": float(chosen.mean()),
        f"{prefix}/rejected_score": float(rejected.mean()),
        f"{prefix}/score_mean": float(both.mean()),
        f"{prefix}/score_std": float(both.std()),
    }


def final_norm(model: nn.Module) -> nn.Module | None:
    """The last layer norm with a bias before the score head (GPT-2's ``ln_f``), or None."""
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.bias is not None]
    return norms[-1] if norms else None


@torch.no_grad()
def calibrate_reward_model(
    model: nn.Module,
    neutral: tuple[Tensor, Tensor],
    everything: tuple[Tensor, Tensor],
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Shift and scale the scores in the weights: ``neutral`` texts to mean 0, ``everything`` to std 1.

    The score head is scaled by 1/std. A head without a bias takes the shift in the final
    layer norm's bias: adding ``c * w / |w|^2`` there adds exactly ``c`` to ``w . h`` for
    every input. The model keeps its class, so ``from_pretrained`` loads it as it is.
    Returns the (shift, scale) applied. ``batch_size`` None scores each set in one forward.
    """
    device = next(model.parameters()).device
    head = model.score
    scale = 1.0 / scores_of(model, everything, device, batch_size).std().item()
    head.weight.mul_(scale)
    if head.bias is not None:
        head.bias.mul_(scale)
    shift = -scores_of(model, neutral, device, batch_size).mean().item()
    if head.bias is not None:
        head.bias.add_(shift)
        return shift, scale
    norm = final_norm(model)
    if norm is None:
        raise ValueError(
            "--calibrate: the score head has no bias and the model no final layer norm with a bias to hold the shift "
            "(e.g. an RMSNorm model); pass --no-calibrate (the scores are then only scaled by the env's score_clip)"
        )
    w = head.weight[0]
    norm.bias.add_(shift * w / w.dot(w))
    return shift, scale


# ---------------------------------------------------------------- the embedded task's entry


def train_reward_model(
    model: nn.Module, pairs: Pairs, fit: FitConfig, generator: torch.Generator, progress: bool = True
) -> list[float]:
    """Bradley-Terry training on encoded pairs with no run directory (the embedded task's build): the same loop as
    ``python -m agents.reward_model``. Returns the loss of each step."""
    loop = SupervisedLoop(model, pair_loss(pairs, torch.device("cpu")), len(pairs), fit, generator, "reward model")
    return loop.run(progress)


# ---------------------------------------------------------------- the command


def load_model(config: RewardModelConfig, tokenizer, saved: Path | None, device: torch.device) -> nn.Module:
    """A one-output sequence classifier: a checkpoint's (resume), the given model's trunk with a new head (a causal
    LM) or as it is (a one-label classifier), or a new GPT-2; float32, dropout off."""
    source, run = config.model, config.run
    torch.manual_seed(config.fit.seed)  # the new head's initialisation
    if saved is not None and not run.lora_rank:
        model = AutoModelForSequenceClassification.from_pretrained(saved, dtype=torch.float32)
    elif source.from_scratch:
        model = GPT2ForSequenceClassification(
            gpt2_config(tokenizer, source.width, source.layers, source.heads, source.positions)
        )
    else:
        check_model_kind(source.model)
        model = load_pretrained(
            AutoModelForSequenceClassification, source.model, "--model", num_labels=1, dtype=torch.float32
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)
    if run.lora_rank:
        from peft import PeftModel

        if saved is not None:
            model = PeftModel.from_pretrained(model, saved, is_trainable=True)
        else:
            model = add_lora(model, run.lora_rank, run.lora_alpha)
            for p in model.base_model.model.score.parameters():
                p.requires_grad_(True)  # the new head trains in full
    return model.to(device)


def check_model_kind(source: str) -> None:
    """A causal LM or a one-label sequence classifier; anything else is refused by name."""
    config = load_config(source, "--model")
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        check_reward_model_config(config, source)
    elif architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(
            f"--model {source!r} holds a {architectures[0]}; the reward model starts from a causal LM (the SFT "
            "policy) or a one-label sequence classifier, or pass --model scratch"
        )


def calibrate(config: RewardModelConfig, model: nn.Module, train: Pairs, held_out: Pairs | None, device) -> dict:
    """Calibrate on the training responses (both sides) and report the held-out figures before and after."""
    check_set = held_out if held_out is not None else train
    before = pair_metrics(model, check_set, device, "before")
    texts = tuple(torch.cat(pad_same(train.chosen[i], train.rejected[i])) for i in range(2))
    shift, scale = calibrate_reward_model(model, neutral=texts, everything=texts, batch_size=128)
    after = pair_metrics(model, check_set, device, "after")
    return {"shift": shift, "scale": scale, **before, **after}


def pad_same(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Two right-padded tensors widened with zeros (padding) to the same width."""
    width = max(a.shape[1], b.shape[1])
    return F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1]))


def train_reward_model_run(config: RewardModelConfig) -> Path:
    """Run (or resume) reward-model training as configured; returns the directory of the final reward model."""
    data, seed = config.data, config.fit.seed
    hint = "name them with --prompt-column, --chosen-column and --rejected-column"
    run = start_run(config, (data.prompt_column, data.chosen_column), hint)  # prompt rows, or chat pairs
    tokenizer = run.tokenizer(lambda: [v for row in run.train_rows for v in row.values() if isinstance(v, str)])
    model = load_model(config, tokenizer, run.saved_model, run.device)
    set_threads(config.run, model, run.device)
    length, device = model_positions(model) or 10**9, run.device
    train = encode_preferences(run.train_rows, tokenizer, data, length, seed, "--data preferences")
    held_out = None
    if run.eval_rows:
        held_out = encode_preferences(run.eval_rows, tokenizer, data, length, seed + 1, "held-out pairs")
    run.record(tokenizer)

    def evaluate(trained: nn.Module) -> Evaluation:
        return Evaluation(pair_metrics(trained, held_out, device) if held_out is not None else {}, [])

    run.train(model, pair_loss(train, device), len(train), evaluate, "reward model", CURVES)
    final = config.run.run_dir / "final"
    if run.dist.is_main:
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if config.calibrate:
            report = calibrate(config, model, train, held_out, device)
            write_atomically(config.run.run_dir / "calibration.json", json.dumps(report, indent=2) + "\n")
        final = save_final(model, tokenizer, config.run.run_dir)
    run.dist.barrier()
    run.dist.shutdown()
    return final


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # "some weights are newly initialized": the new score head, on purpose
    try:
        config = command_line(RewardModelConfig, argv, __doc__)
        final = train_reward_model_run(config)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    calibration = Path(config.run.run_dir) / "calibration.json"
    if calibration.is_file():
        report = json.loads(calibration.read_text())
        print(
            f"calibration: scores x {report['scale']:.3f} then {report['shift']:+.3f}; held-out accuracy "
            f"{report['before/accuracy']:.3f} -> {report['after/accuracy']:.3f}, score mean "
            f"{report['before/score_mean']:+.3f} -> {report['after/score_mean']:+.3f}, std "
            f"{report['before/score_std']:.3f} -> {report['after/score_std']:.3f}"
        )
    print(f"final reward model: {final}  (python -m agents --reward-model {final})")


if __name__ == "__main__":
    main()
