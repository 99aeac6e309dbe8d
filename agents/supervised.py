"""The one training loop of supervised fine-tuning (step 1) and reward-model training (step 2).

Both steps draw a batch of rows at random each step (with replacement, from a seeded
generator), take AdamW (weight decay 0.01) at a learning rate that warms up linearly
over the first 5% of steps and then decays along a cosine to 10% of its peak, and clip
the gradient norm to 1. The embedded tasks' models are built with this loop
(``agents.build``); ``python -m agents.sft`` and ``python -m agents.reward_model`` run
it on a user's data, in a run directory:

    run_dir/config.json                   the settings (compared on --resume)
    run_dir/checkpoint-000199/            the model, optimizer and generator after step 199 (``agents.checkpoint``:
                                          written atomically, read with weights_only, the two newest kept)
    run_dir/metrics.jsonl, metrics.csv, tensorboard/, samples.jsonl, learning_curve.png
    run_dir/final/                        model and tokenizer: ``from_pretrained`` loads it

A resumed run continues bitwise as if it had not stopped: the weights, the optimizer's
moments, the generator's state and the step come back from the checkpoint, and the
learning rate is a function of the step. SIGINT (Ctrl-C) or SIGTERM finishes the step in
progress, writes a checkpoint and stops. Under torchrun each process draws its own
rows (seed + rank * ``RANK_SEED_PRIME``) and DistributedDataParallel averages the
gradients; rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GPT2Config, PreTrainedTokenizerBase

from agents.checkpoint import Checkpoints, TrainerState
from agents.distributed import Distributed
from agents.logger import RunLogger, write_atomically
from agents.train import StopSignals, TrainingStopped, default_threads
from textenv.config import AsPath, check_float, check_int
from textenv.default_task.tokenizer import build_tokenizer as bpe_tokenizer
from textenv.loading import (
    ALL_ROWS_SPLIT,
    has_splits,
    load_pretrained,
    looks_like_path,
    read_prompt_rows,
    resolve_device,
)

BatchLoss = Callable[[nn.Module, Tensor], Tensor]
"""``loss(model, rows)``: the mean loss of the examples at the indices ``rows``, with its graph."""

CONFIG_FILE = "config.json"
SCRATCH = "scratch"


@dataclass
class FitConfig:
    """The optimisation: steps, batch, learning rate."""

    steps: int = 500
    """Optimizer steps."""
    batch_size: int = 32
    """Examples per step (per process under torchrun), drawn at random with replacement."""
    learning_rate: float = 1e-3
    """Peak learning rate: linear warm-up over the first 5% of steps, then cosine decay to 10% of it."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    seed: int = 0
    """Seed of the model's initialisation (from scratch, or a new head), the held-out split and the batches."""

    def validate(self) -> None:
        check_int("steps", self.steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_float("learning_rate", self.learning_rate, "> 0", lambda v: v > 0)
        check_float("weight_decay", self.weight_decay, ">= 0", lambda v: v >= 0)


@dataclass
class ModelSource:
    """The model to start from, and its tokenizer."""

    model: Annotated[str, AsPath] = SCRATCH
    """A transformers model directory or hub name, or 'scratch': a new GPT-2 of --layers, --width, --heads and
    --positions, with a tokenizer trained on the data unless --tokenizer is given."""
    tokenizer: Annotated[str | None, AsPath] = None
    """The tokenizer, a directory or hub name (default: the model's; from scratch: trained on the training data)."""
    tokenizer_kind: Literal["bpe", "characters"] = "bpe"
    """From scratch: a BPE tokenizer (words split on spaces and punctuation) or one token per character."""
    vocab_size: int = 1024
    """From scratch: the BPE vocabulary's upper bound (the data may need fewer)."""
    layers: int = 2
    """From scratch: transformer blocks."""
    width: int = 128
    """From scratch: the embedding width."""
    heads: int = 4
    """From scratch: attention heads (must divide --width)."""
    positions: int = 128
    """From scratch: the longest sequence the model reads (prompt + response)."""

    @property
    def from_scratch(self) -> bool:
        return self.model == SCRATCH

    def validate(self) -> None:
        for name in ("vocab_size", "layers", "width", "heads", "positions"):
            check_int(name, getattr(self, name), minimum=1)
        if self.width % self.heads:
            raise ValueError(f"--heads ({self.heads}) must divide --width ({self.width})")
        if not self.from_scratch and looks_like_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise FileNotFoundError(f"--model {self.model!r} is not a directory: pass a saved model's directory")


@dataclass
class RowsSource:
    """Where the rows come from, which field holds the prompt, and the held-out share."""

    data: Annotated[str, AsPath] = "data.jsonl"
    """JSON lines (or .json), or a saved datasets directory."""
    eval_data: Annotated[str | None, AsPath] = None
    """Held-out rows (default: the data's eval/test/validation split, else --eval-fraction of its rows)."""
    eval_fraction: float = 0.05
    """Share of the rows held out when the data has no splits and no --eval-data (0: none)."""
    prompt_column: str = "prompt"
    """The prompt's field: a string, or a chat conversation (a list of role/content dicts)."""
    chat_template: bool = False
    """Read string prompts as one user message through the tokenizer's chat template (as the env's option)."""
    truncate: bool = False
    """Cut texts longer than the model's positions to their first tokens (counted in the log) instead of refusing
    them."""

    def validate(self) -> None:
        check_float("eval_fraction", self.eval_fraction, "in [0, 1)", lambda v: 0 <= v < 1)


@dataclass
class RunDirConfig:
    """Where the run writes, how often, and on what."""

    run_dir: Path = Path("runs/sft")
    """Metrics, samples, the learning curve, checkpoints and final/ go here."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint (its config.json must match; --steps, --eval-every,
    --checkpoint-every, --log-every, --progress, --device and --threads may change)."""
    eval_every: int = 100
    """Steps between evaluations on the held-out examples (and after the last)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (and after the last)."""
    log_every: int = 10
    """Steps between rows of metrics.jsonl."""
    lora_rank: int = 0
    """Train PEFT LoRA adapters of this rank instead of all weights (0: every weight); final/ holds them merged."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    device: str | None = None
    """'cpu', 'cuda', ... (default: CUDA when available)."""
    threads: int | None = None
    """torch's CPU threads (default: 1 for a model under 50M parameters on the CPU, else torch's choice)."""
    progress: bool = True
    """Show a progress bar."""
    allow_existing_run_dir: bool = False
    """Start a run in a non-empty directory that holds no run (its files are left alone)."""

    def validate(self) -> None:
        for name in ("eval_every", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("lora_rank", self.lora_rank, minimum=0)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)


RESUMABLE = {"fit.steps", "run.eval_every", "run.checkpoint_every", "run.log_every", "run.progress", "run.device"}
RESUMABLE |= {"run.threads", "run.resume", "run.allow_existing_run_dir"}


# ---------------------------------------------------------------- models and tokenizers from scratch


def learning_rate_factor(step: int, steps: int) -> float:
    """The learning rate of ``step`` (from 0) as a share of the peak: warm-up over ``steps // 20``, then cosine."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


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


def train_tokenizer(texts: list[str], kind: str, vocab_size: int) -> PreTrainedTokenizerBase:
    """A tokenizer trained on ``texts``: BPE, or one token per character (``textenv.arithmetic.tokenizer``'s kind);
    ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2 (PAD distinct from EOS)."""
    if kind == "bpe":
        return bpe_tokenizer(texts, vocab_size)
    from textenv.arithmetic.tokenizer import build_tokenizer as character_tokenizer

    return character_tokenizer("".join(sorted(set("".join(texts)))))


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """PAD and EOS exist and differ: a model whose PAD is its EOS cannot learn to stop (its EOS would be masked)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {source} has no EOS token; set tokenizer.eos_token and save it")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer of {source} has no PAD token; add one distinct from EOS "
            "(tokenizer.add_special_tokens({'pad_token': '<pad>'}), then resize the model's embeddings) and save it"
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"the tokenizer of {source} uses its EOS token {tokenizer.eos_token!r} as PAD: the loss could not tell "
            "a response's end from padding. Add a distinct PAD token (tokenizer.add_special_tokens({'pad_token': "
            "'<pad>'}), then model.resize_token_embeddings(len(tokenizer))) and save both"
        )


# ---------------------------------------------------------------- the loop


@dataclass
class Evaluation:
    """What an evaluation returns: metrics (``eval/...``) and samples for samples.jsonl."""

    metrics: dict[str, float]
    samples: list[dict]


class SupervisedLoop:
    """The steps of one supervised run: ``run`` draws rows, computes ``loss``, steps AdamW, logs and checkpoints.

    Without a ``writer`` (the embedded tasks' builds) nothing is written; the same
    arithmetic happens either way, so a build and a run of the same data and seed end
    with the same weights.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: BatchLoss,
        n_rows: int,
        fit: FitConfig,
        generator: torch.Generator,
        desc: str,
        writer: RunWriter | None = None,
        dist: Distributed | None = None,
    ):
        fit.validate()
        if n_rows < 1:
            raise ValueError(f"{desc}: no training examples")
        self.model, self.loss, self.n_rows, self.fit, self.generator = model, loss, n_rows, fit, generator
        self.desc, self.writer, self.dist = desc, writer, dist or Distributed(torch.device("cpu"))
        self.trained = self.dist.wrap(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=fit.learning_rate, weight_decay=fit.weight_decay)
        self.start = 0

    def restore(self, optimizer: dict, generator_states: list, step: int) -> None:
        """Continue after ``step``: the optimizer's state and this rank's generator state from a checkpoint."""
        self.optimizer.load_state_dict(optimizer)
        self.generator.set_state(generator_states[self.dist.rank][0])
        self.start = step + 1

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns (loss, gradient norm before clipping)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.fit.learning_rate * learning_rate_factor(step, self.fit.steps)
        rows = torch.randint(0, self.n_rows, (self.fit.batch_size,), generator=self.generator)
        loss = self.loss(self.trained, rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.item(), float(norm)

    def run(self, progress: bool = True) -> list[float]:
        """Steps from ``start`` to ``fit.steps``; returns the training loss of each. The model is left in eval mode."""
        self.model.train()
        losses = []
        bar = tqdm(
            range(self.start, self.fit.steps),
            desc=self.desc,
            disable=not (progress and self.dist.is_main),
            initial=self.start,
            total=self.fit.steps,
        )
        with StopSignals() as signals:
            for step in bar:
                loss, norm = self.step(step)
                if not math.isfinite(loss):
                    raise FloatingPointError(self.non_finite(step, loss))
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.writer is not None:
                    self.writer.after_step(self, step, loss, norm)
                if signals.requested(self.dist):
                    self.writer_stop(step, signals.signal_name, bar)
        self.model.eval()
        return losses

    def non_finite(self, step: int, loss: float) -> str:
        where = f"; the last good checkpoint is {self.writer.checkpoints.latest()}" if self.writer else ""
        return f"{self.desc}: the loss of step {step} is {loss}{where}. Lower --learning-rate or check the data"

    def writer_stop(self, step: int, signal_name: str, bar: tqdm) -> None:
        bar.close()
        if self.writer is None:
            raise KeyboardInterrupt
        if step % self.writer.run.checkpoint_every != self.writer.run.checkpoint_every - 1:
            self.writer.save_checkpoint(self, step)
        self.writer.close()
        raise TrainingStopped(
            f"stopped by {signal_name} after step {step}; checkpoint {self.writer.checkpoints.latest()}; "
            f"continue with --run-dir {self.writer.run.run_dir} --resume",
            exit_code=128 + signal.Signals[signal_name].value,
        )


SUPERVISED_CURVES = (
    ("loss/train", "eval/loss", "loss"),
    ("perf/lr", None, "learning rate"),
)


class RunWriter:
    """Everything a supervised run writes: metrics, samples, checkpoints, the curve, final/."""

    def __init__(
        self,
        run: RunDirConfig,
        evaluate: Callable[[nn.Module], Evaluation],
        start: int,
        dist: Distributed,
        curves=SUPERVISED_CURVES,
    ):
        self.run, self.evaluate, self.dist = run, evaluate, dist
        self.checkpoints = Checkpoints(run.run_dir)
        self.logger = RunLogger(run.run_dir, start, curves=curves) if dist.is_main else None

    def after_step(self, loop: SupervisedLoop, step: int, loss: float, norm: float) -> None:
        last = step == loop.fit.steps - 1
        metrics = {"loss/train": loss, "perf/grad_norm": norm, "perf/lr": loop.optimizer.param_groups[0]["lr"]}
        samples: list[dict] = []
        evaluated = (step + 1) % self.run.eval_every == 0 or last
        if evaluated:
            loop.model.eval()
            evaluation = self.evaluate(loop.model)
            loop.model.train()
            metrics |= evaluation.metrics
            samples = evaluation.samples
        if (step + 1) % self.run.log_every == 0 or evaluated:  # an evaluation's figures are always logged
            metrics = self.dist.mean_metrics(metrics)
            if self.dist.enabled:  # 0 when the replicas hold the same weights, as DDP keeps them
                metrics["dist/parameter_spread"] = self.dist.parameter_spread(loop.model)
            self.log(step, metrics, samples)
        if (step + 1) % self.run.checkpoint_every == 0 or last:
            self.save_checkpoint(loop, step)

    def log(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None:
        if self.logger is not None:
            self.logger.log(step, metrics, samples)
            self.logger.plot(wait=False)

    def save_checkpoint(self, loop: SupervisedLoop, step: int) -> None:
        generators = self.dist.gather([loop.generator.get_state()])
        if self.dist.is_main:
            state = TrainerState(step, 0.0, step + 1, self.dist.world_size)  # tokens: steps taken; no KL here
            self.checkpoints.save(step, loop.model, loop.optimizer.state_dict(), generators, state)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.plot()
            self.logger.close()


# ---------------------------------------------------------------- the run directory


def settings(config) -> dict[str, object]:
    """``{"fit.steps": 500, ...}``: a run's settings as config.json stores them (paths as text)."""
    return flatten(json.loads(json.dumps(asdict(config), default=str)))


def flatten(data: dict) -> dict[str, object]:
    """``{"fit": {"steps": 500}, "samples": 4}`` as ``{"fit.steps": 500, "samples": 4}``."""
    flat: dict[str, object] = {}
    for part, value in data.items():
        if isinstance(value, dict):
            flat |= {f"{part}.{key}": inner for key, inner in value.items()}
        else:
            flat[part] = value
    return flat


def prepare_run_dir(config, run: RunDirConfig, checkpoints: Checkpoints):
    """A new run: the directory is new or empty (or ``allow_existing_run_dir``); config.json is written.
    A resumed one: config.json matches ``config`` outside ``RESUMABLE``; returns its checkpoint (``Resumed``)."""
    run_dir = Path(run.run_dir)
    path = run_dir / CONFIG_FILE
    if run.resume:
        resumed = checkpoints.resume()
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"--resume: cannot read {path} ({error})") from error
        given = settings(config)
        saved = flatten(saved)
        changed = sorted(k for k in saved.keys() | given.keys() if saved.get(k) != given.get(k) and k not in RESUMABLE)
        if changed:
            listing = "; ".join(f"{k.split('.')[-1]}: {saved.get(k)!r} -> {given.get(k)!r}" for k in changed)
            raise ValueError(
                f"--resume: these settings differ from the run's {path}: {listing}. Only "
                f"{', '.join(sorted(k.split('.', 1)[1] for k in RESUMABLE - {'run.resume'}))} may change"
            )
        return resumed
    if checkpoints.latest() is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file; choose a directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not path.is_file() and not run.allow_existing_run_dir:
        raise FileExistsError(
            f"--run-dir {run_dir} is not empty and holds no run; choose another directory, or pass "
            "--allow-existing-run-dir to write into it (its other files are left alone)"
        )
    return None


def write_config(config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(asdict(config), default=str))
    write_atomically(run_dir / CONFIG_FILE, json.dumps(data, indent=2) + "\n")


def save_final(model: nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path) -> Path:
    """The trained model (LoRA adapters merged into their base) and its tokenizer in run_dir/final."""
    final = Path(run_dir) / "final"
    partial = final.with_name(".final.partial")
    if hasattr(model, "merge_and_unload"):  # a PEFT model: one plain model that from_pretrained loads
        model = model.merge_and_unload()
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final


# ---------------------------------------------------------------- data


def read_rows(source, column: str, split: str, what: str) -> list[dict]:
    """The rows of a JSON-lines or JSON file, a saved ``datasets`` directory, a dataset or a list of dicts, each with
    ``column`` (``textenv.loading.read_prompt_rows`` reads them, with its checks and errors)."""
    values, rows = read_prompt_rows(source, column, split=split, what=what)
    if not rows:
        raise ValueError(
            f"{what} must be rows with named fields (JSON lines, a datasets dataset or a list of dicts); "
            f"got plain text, one item a line"
        )
    return [{column: value, **row} for value, row in zip(values, rows)]


def split_rows(source, eval_source, column: str, eval_fraction: float, seed: int, what: str):
    """(train rows, held-out rows): ``eval_source``'s rows; else the source's eval split where it has splits; else
    a seeded ``eval_fraction`` of its rows (at least one), the rest training."""
    if eval_source is not None:
        return read_rows(source, column, ALL_ROWS_SPLIT, what), read_rows(eval_source, column, "train", "--eval-data")
    if has_splits(source):
        return read_rows(source, column, "train", what), read_rows(source, column, "eval", what)
    rows = read_rows(source, column, ALL_ROWS_SPLIT, what)
    if eval_fraction == 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise ValueError(
            f"{what} has {len(rows)} rows: too few to hold out {eval_fraction:.0%} and train on the rest; add rows, "
            "lower --eval-fraction (0: no held-out evaluation) or pass --eval-data"
        )
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def split_rows_by_either(source, eval_source, columns: tuple[str, str], eval_fraction: float, seed: int, hint: str):
    """``split_rows`` keyed by the first of ``columns`` the rows have (prompt rows, or chat rows); rows with neither
    are refused naming both and ``hint``, the flags that name them."""
    errors = []
    for column in columns:
        try:
            return split_rows(source, eval_source, column, eval_fraction, seed, "--data")
        except ValueError as error:
            if f"no {column!r}" not in str(error):
                raise
            errors.append(str(error))
    raise ValueError(
        f"{errors[0].split(' has no ')[0]} has neither a {columns[0]!r} nor a {columns[1]!r} field; {hint}"
    )


def text_field(row: dict, column: str, number: int, what: str) -> str:
    """A non-empty string field of a row, or an error naming the row and the column."""
    if column not in row:
        raise ValueError(f"{what} row {number} has no {column!r} field (it has {sorted(row)}); name it with --{column}")
    value = row[column]
    if not isinstance(value, str):
        raise ValueError(f"{what} row {number}: {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} row {number}: {column!r} is empty; remove the row or fill it in")
    return value


def fit_to_length(sequences: list[list[int]], max_length: int, truncate: bool, what: str, parallel: tuple = ()) -> int:
    """Sequences longer than the model reads: refused (naming how many and the longest), or with ``truncate``
    cut to their first ``max_length`` tokens in place (and the lists of ``parallel`` alike). Returns how many."""
    long = [i for i, s in enumerate(sequences) if len(s) > max_length]
    if long and not truncate:
        longest = max(len(sequences[i]) for i in long)
        raise ValueError(
            f"{len(long)} {what} (row {long[0]} first) are longer than the model's {max_length} positions (the "
            f"longest has {longest} tokens); shorten them, use a model with more positions (--positions from "
            "scratch), or pass --truncate to keep each one's first tokens (its end, EOS included, is then lost)"
        )
    for i in long:
        for column in (sequences, *parallel):
            del column[i][max_length:]
    return len(long)


# ---------------------------------------------------------------- the command line


def config_from_json(cls, data: dict):
    """A run's config dataclass (``cls``: groups of fields) back from its config.json."""
    parts = {}
    for name, group in cls.__dataclass_fields__.items():
        if name not in data:
            continue
        kind = group.default_factory() if callable(group.default_factory) else None
        if kind is None or not hasattr(kind, "__dataclass_fields__"):
            parts[name] = data[name]
            continue
        values = dict(data[name])
        if "run_dir" in values:
            values["run_dir"] = Path(values["run_dir"])
        unknown = sorted(set(values) - set(kind.__dataclass_fields__))
        if unknown:
            raise ValueError(f"--resume: config.json holds settings this version does not know: {', '.join(unknown)}")
        parts[name] = type(kind)(**values)
    return cls(**parts)


def command_line(cls, argv: list[str] | None, description: str):
    """``cls`` from the command line; with ``--resume`` the run's config.json gives the defaults, so
    ``--run-dir DIR --resume`` alone continues it (and a flag that changes a setting is checked)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = dict(config=(tyro.conf.OmitArgPrefixes,), description=description)
    config = tyro.cli(cls, args=argv, **options)
    saved = Path(config.run.run_dir) / CONFIG_FILE
    if config.run.resume and saved.is_file():
        try:
            data = json.loads(saved.read_text())
        except ValueError as error:
            raise ValueError(f"--resume: {saved} is not JSON ({error})") from error
        default = config_from_json(cls, data)
        default.run.resume = True
        config = tyro.cli(cls, args=argv, default=default, **options)
    return config


# ---------------------------------------------------------------- one run, start to finish


@dataclass
class Run:
    """A supervised run being set up: its processes, its checkpoint to resume from (None: new), its rows."""

    config: object  # SFTConfig or RewardModelConfig: data, model, fit, run
    dist: Distributed
    resumed: object | None  # agents.checkpoint.Resumed
    train_rows: list[dict]
    eval_rows: list[dict]

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def saved_model(self) -> Path | None:
        return None if self.resumed is None else self.resumed.directory / "agent"

    def tokenizer(self, texts: Callable[[], list[str]]) -> PreTrainedTokenizerBase:
        """The run's tokenizer: the one it saved (resume), the given one, the model's, or one trained on ``texts()``
        (the training rows' texts) for a model from scratch."""
        source = self.config.model
        if self.resumed is not None:
            tokenizer = AutoTokenizer.from_pretrained(Path(self.config.run.run_dir) / "tokenizer")
        elif source.tokenizer is not None or not source.from_scratch:
            tokenizer = load_pretrained(AutoTokenizer, source.tokenizer or source.model, "--tokenizer")
        else:
            tokenizer = train_tokenizer(texts(), source.tokenizer_kind, source.vocab_size)
        check_tokenizer(tokenizer, source.tokenizer or source.model)
        return tokenizer

    def record(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """A new run's config.json and tokenizer, written once everything has loaded (a failed start leaves none)."""
        if self.dist.is_main and self.resumed is None:
            write_config(self.config, Path(self.config.run.run_dir))
            tokenizer.save_pretrained(Path(self.config.run.run_dir) / "tokenizer")
        self.dist.barrier()

    def train(self, model: nn.Module, loss: BatchLoss, n_rows: int, evaluate, desc: str, curves) -> None:
        """The steps, from the start or the checkpoint, with the evaluation before the first step logged as step
        -1 (the starting point); the model is left in eval mode."""
        config, dist = self.config, self.dist
        start = 0 if self.resumed is None else self.resumed.state.iteration + 1
        writer = RunWriter(config.run, evaluate, start, dist, curves=curves)
        generator = torch.Generator().manual_seed(dist.seed(config.fit.seed))
        loop = SupervisedLoop(model, loss, n_rows, config.fit, generator, desc, writer, dist)
        if self.resumed is not None:
            loop.restore(self.resumed.optimizer, self.resumed.generators, self.resumed.state.iteration)
        if loop.start == 0:
            writer.log(-1, dist.mean_metrics(evaluate(model).metrics), [])
        loop.run(config.run.progress)
        writer.close()


def start_run(config, columns: tuple[str, str], hint: str) -> Run:
    """Check the settings and the run directory, read and split the rows (keyed by the first of ``columns`` they
    have; ``hint`` names the flags that name them)."""
    config.validate()
    run, data = config.run, config.data
    dist = Distributed(resolve_device(run.device))
    resumed = prepare_run_dir(config, run, Checkpoints(run.run_dir))
    rows = split_rows_by_either(data.data, data.eval_data, columns, data.eval_fraction, config.fit.seed, hint)
    return Run(config, dist, resumed, *rows)


def set_threads(run: RunDirConfig, model: nn.Module, device: torch.device) -> None:
    torch.set_num_threads(run.threads or default_threads(model, device))
