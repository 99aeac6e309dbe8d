"""Step 1 of RLHF, supervised fine-tuning: teach a causal LM to answer prompts as the demonstrations do.

    python -m agents.sft --data demonstrations.jsonl --run-dir runs/sft [--model DIR | scratch]

A demonstration is a row with a ``prompt`` and a ``response`` (names set by
``--prompt-column`` and ``--response-column``), or a chat ``messages`` list whose
assistant turns are the responses. The loss is the cross-entropy of the response tokens
only, averaged over the batch's response tokens; the prompt's tokens are read but not
predicted (as DeepSpeed-Chat's and TRL's SFT do). Each response is followed by EOS, so
the policy learns to stop. The prompt is tokenized exactly as the env tokenizes it
(``textenv.loading.tokenize_prompts``: a conversation through the chat template with
the generation prompt, prompt text never turned into control tokens), and the response
as the text after it: the policy trains on the token layout it will act in.

Each evaluation logs the held-out loss and perplexity (per response token) and a few
samples; ``final/`` is the policy, loadable with ``AutoModelForCausalLM.from_pretrained``
and ready for ``python -m agents --policy``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from agents.lora import add_lora
from agents.packing import lm_packing_works, plan_packing
from agents.supervised import (
    SUPERVISED_CURVES,
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
from textenv.lm import disable_dropout, pad_batch, sample
from textenv.loading import check_messages, load_config, load_pretrained, model_positions, tokenize_prompts
from textenv.text import encode_text

IGNORE = -100  # the label of a position without loss (PyTorch's cross_entropy ignore_index)


@dataclass
class DemonstrationData(RowsSource):
    """The demonstrations, their fields, and the held-out share."""

    data: Annotated[str, AsPath] = "demonstrations.jsonl"
    """JSON lines (or .json), or a saved datasets directory: rows with a prompt and a response, or chat messages."""
    response_column: str = "response"
    """The response's field: a string, the text that follows the prompt."""
    messages_column: str = "messages"
    """For rows without a prompt: a chat conversation whose assistant messages are the responses."""


@dataclass
class SFTConfig:
    data: DemonstrationData = field(default_factory=DemonstrationData)
    model: ModelSource = field(default_factory=ModelSource)
    fit: FitConfig = field(default_factory=FitConfig)
    run: RunDirConfig = field(default_factory=lambda: RunDirConfig(run_dir=Path("runs/sft")))
    samples: int = 4
    """Held-out prompts sampled at each evaluation (written to samples.jsonl)."""
    sample_tokens: int = 32
    """Longest sampled response."""
    packing: bool = True
    """Pack each batch's demonstrations several to a row (positions restarting, none attending to another) where
    that saves work and the model keeps packed sequences apart (probed once; else padded rows, with a warning)."""

    def validate(self) -> None:
        for part in (self.data, self.model, self.fit, self.run):
            part.validate()


@dataclass
class Encoded:
    """Demonstrations as right-padded tensors: ids, attention mask, and labels (``IGNORE`` off the responses)."""

    ids: Tensor
    mask: Tensor
    labels: Tensor
    prompt_ids: list[list[int]]  # each demonstration's first prompt (what a sample continues)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- demonstrations to tokens


def encode_demonstrations(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, data: DemonstrationData, max_length: int, what: str
) -> Encoded:
    """Token ids and labels of each row (prompt and response, or chat messages); see the module docstring."""
    if data.prompt_column in rows[0]:
        sequences, labels, prompts = encode_prompt_response(rows, tokenizer, data, what)
    else:
        sequences, labels, prompts = encode_messages(rows, tokenizer, data.messages_column, what)
    truncated = fit_to_length(sequences, max_length, data.truncate, what, parallel=(labels,))
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id, side="right")
    return Encoded(ids, mask, pad_batch(labels, IGNORE, side="right")[0], prompts, truncated)


def encode_prompt_response(rows: list[dict], tokenizer, data: DemonstrationData, what: str):
    """(sequences, labels, prompt ids): the prompt as the env tokenizes it, then the response's text and EOS."""
    for number, row in enumerate(rows):
        if data.prompt_column not in row:
            raise ValueError(
                f"{what} row {number} has no {data.prompt_column!r} field (it has {sorted(row)}): give every row a "
                "prompt, or none (chat messages)"
            )
    responses = [text_field(row, data.response_column, number, what) for number, row in enumerate(rows)]
    _, prompt_ids = tokenize_prompts(
        [row[data.prompt_column] for row in rows], tokenizer, 10**9, "error", chat_template=data.chat_template
    )
    sequences, labels = [], []
    for prompt, response in zip(prompt_ids, responses):
        answer = encode_text(tokenizer, response, add_special_tokens=False) + [tokenizer.eos_token_id]
        sequences.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    return sequences, labels, prompt_ids


def encode_messages(rows: list[dict], tokenizer, column: str, what: str):
    """(sequences, labels, prompt ids) of chat rows: each assistant message's tokens, as the template writes them up
    to the next turn, are labelled; the template renders a conversation's prefix as the prefix of its tokens."""
    if not tokenizer.chat_template:
        raise ValueError(f"{what} are chat messages, but the tokenizer has no chat template; give it one")
    sequences, labels, prompts = [], [], []
    for number, row in enumerate(rows):
        messages = row.get(column)
        if not isinstance(messages, list) or not any(m.get("role") == "assistant" for m in messages):
            raise ValueError(
                f"{what} row {number} has neither a prompt field nor a {column!r} list with an assistant message; "
                "name the fields with --prompt-column/--response-column or --messages-column"
            )
        check_messages(messages, tokenizer, number, "tokenizer")
        full = render(tokenizer, messages, False)
        label = [IGNORE] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1], False)
            if through != full[: len(through)] or before != through[: len(before)]:
                raise ValueError(
                    f"{what} row {number}: the tokenizer's chat template does not write a conversation's first turns "
                    "as the start of the whole (it may drop earlier turns' reasoning); split the conversation into "
                    "prompt/response rows"
                )
            label[len(before) : len(through)] = through[len(before) :]
        sequences.append(full)
        labels.append(label)
        first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(render(tokenizer, messages[:first], True))
    return sequences, labels, prompts


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---------------------------------------------------------------- the loss and the evaluation


def response_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """The mean cross-entropy of the labelled (response) tokens of a right-padded batch: the SFT loss."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def packed_response_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """``response_loss`` with the batch's demonstrations packed several to a row (``agents.packing``): each one's
    positions restart at 0 and no mask is passed, so none attends to another; the same mean over the labelled
    tokens, up to float rounding. Rows that do not pack into fewer cells run padded."""
    packing = plan_packing(ids, mask)
    if packing is None:
        return response_loss(model, ids, mask, labels)
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]  # right-padded rows: token t + 1's label at position t, as the loss shifts
    packed_target = torch.full((packing.ids.numel(),), IGNORE, dtype=labels.dtype, device=labels.device)
    packed_target[packing.index[packing.real]] = target[packing.real]
    # no cache: transformers reads restarting positions as sequence boundaries only without one
    logits = model(input_ids=packing.ids, position_ids=packing.position_ids, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), packed_target, ignore_index=IGNORE)


def batch_loss(data: Encoded, device: torch.device, crop: bool = True, pack: bool = False):
    """``loss(model, rows)`` over the demonstrations at ``rows``; ``crop`` drops the columns that are padding in
    every row of the batch (the embedded tasks' builds keep the full width, as they always did); ``pack`` packs
    them (``packed_response_loss``) where the model keeps packed sequences apart (``lm_packing_works``)."""
    labels = data.labels.masked_fill(data.mask == 0, IGNORE)

    def loss(model: nn.Module, rows: Tensor) -> Tensor:
        ids, mask, target = data.ids[rows], data.mask[rows], labels[rows]
        if crop:
            width = int(mask.sum(1).max())
            ids, mask, target = ids[:, :width], mask[:, :width], target[:, :width]
        compute = packed_response_loss if pack and lm_packing_works(model) else response_loss
        return compute(model, ids.to(device), mask.to(device), target.to(device))

    return loss


@torch.no_grad()
def held_out_loss(model: nn.Module, data: Encoded, device: torch.device, batch_size: int = 64) -> float:
    """Mean cross-entropy per response token over every held-out demonstration (not a mean of batch means)."""
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        ids, mask = data.ids[start : start + batch_size], data.mask[start : start + batch_size]
        labels = data.labels[start : start + batch_size].masked_fill(mask == 0, IGNORE)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
        total, count = total + float(nll), count + int((target != IGNORE).sum())
    return total / max(count, 1)


def evaluator(held_out: Encoded | None, tokenizer, config: SFTConfig, device: torch.device):
    """The evaluation of a run: held-out loss and perplexity, and ``config.samples`` sampled responses."""

    def evaluate(model: nn.Module) -> Evaluation:
        if held_out is None:
            return Evaluation({}, [])
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        loss = held_out_loss(base, held_out, device)
        prompts = held_out.prompt_ids[: config.samples]
        generator = torch.Generator(device=device).manual_seed(config.fit.seed)
        room = (model_positions(base) or 10**9) - max(len(p) for p in prompts)  # sample within the model's positions
        tokens = min(config.sample_tokens, room)
        if tokens < 1 or not prompts:
            return Evaluation({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}, [])
        drawn = sample(base, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, tokens, 1.0, generator)
        samples = [
            {"prompt": tokenizer.decode(p), "response": tokenizer.decode(r, skip_special_tokens=True), "eos": e}
            for p, r, e in zip(drawn.prompt_ids, drawn.response_ids, drawn.ended_with_eos)
        ]
        return Evaluation({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}, samples)

    return evaluate


# ---------------------------------------------------------------- the embedded tasks' entry


def train_policy(
    model: nn.Module, data: Encoded, fit: FitConfig, generator: torch.Generator, progress: bool = True
) -> list[float]:
    """Supervised fine-tuning on encoded demonstrations with no run directory (the embedded tasks' builds): the
    same loop as ``python -m agents.sft``, on full-width rows. Returns the loss of each step."""
    loop = SupervisedLoop(model, batch_loss(data, torch.device("cpu"), crop=False), len(data), fit, generator, "SFT")
    return loop.run(progress)


# ---------------------------------------------------------------- the command


def load_model(config: SFTConfig, tokenizer, saved: Path | None, device: torch.device) -> nn.Module:
    """The model to train: a checkpoint's (resume), the given causal LM, or a new GPT-2; float32, dropout off."""
    source, run = config.model, config.run
    torch.manual_seed(config.fit.seed)
    if source.from_scratch:
        base = GPT2LMHeadModel(gpt2_config(tokenizer, source.width, source.layers, source.heads, source.positions))
    else:
        check_causal_lm(source.model)
        base = load_pretrained(AutoModelForCausalLM, source.model, "--model", dtype=torch.float32)
    if saved is not None and not run.lora_rank:
        base = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    check_vocabulary(tokenizer, base)
    disable_dropout(base)  # deterministic steps: a resumed run continues bitwise
    model = base
    if run.lora_rank:
        if saved is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, saved, is_trainable=True)
        else:
            model = add_lora(base, run.lora_rank, run.lora_alpha)
    return model.to(device)


def check_causal_lm(source: str) -> None:
    """A directory (or hub name) of a causal LM: a sequence classifier or other head is refused by name."""
    architectures = getattr(load_config(source, "--model"), "architectures", None) or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(
            f"--model {source!r} holds a {architectures[0]}, not a causal LM; SFT trains a model with an LM head "
            "(a ...ForCausalLM directory), or pass --model scratch"
        )


def check_vocabulary(tokenizer, model: nn.Module) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows: they do not "
            "belong together; pass the model's own tokenizer, or resize the model's embeddings and save it"
        )


def training_texts(rows: list[dict], data: DemonstrationData) -> list[str]:
    """Every text of the rows a new tokenizer learns from: prompts and responses, or the messages' contents."""
    texts = []
    for row in rows:
        for value in (row.get(data.prompt_column), row.get(data.response_column), row.get(data.messages_column)):
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return texts


def train_sft(config: SFTConfig) -> Path:
    """Run (or resume) supervised fine-tuning as configured; returns the directory of the final policy."""
    data = config.data
    hint = "name them with --prompt-column or --messages-column"
    run = start_run(config, (data.prompt_column, data.messages_column), hint)
    tokenizer = run.tokenizer(lambda: training_texts(run.train_rows, data))
    model = load_model(config, tokenizer, run.saved_model, run.device)
    set_threads(config.run, model, run.device)
    max_length = model_positions(model) or 10**9
    train = encode_demonstrations(run.train_rows, tokenizer, data, max_length, "--data demonstrations")
    held_out = None
    if run.eval_rows:
        held_out = encode_demonstrations(run.eval_rows, tokenizer, data, max_length, "held-out demonstrations")
    run.record(tokenizer)
    report_truncation(train, held_out)
    evaluate = evaluator(held_out, tokenizer, config, run.device)
    run.train(model, batch_loss(train, run.device, pack=config.packing), len(train), evaluate, "SFT", SUPERVISED_CURVES)
    final = save_final(model, tokenizer, config.run.run_dir) if run.dist.is_main else config.run.run_dir / "final"
    run.dist.barrier()
    run.dist.shutdown()
    return final


def report_truncation(train: Encoded, held_out: Encoded | None) -> None:
    cut = train.truncated + (held_out.truncated if held_out is not None else 0)
    if cut:
        print(f"note: --truncate cut {cut} demonstrations to the model's positions", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    hf_logging.disable_progress_bar()
    try:
        config = command_line(SFTConfig, argv, __doc__)
        final = train_sft(config)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"final policy: {final}  (AutoModelForCausalLM.from_pretrained loads it; python -m agents --policy {final})")


if __name__ == "__main__":
    main()
