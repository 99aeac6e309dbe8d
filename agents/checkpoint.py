"""Checkpoints of a training run: written atomically, checked when read, resumed from.

    run_dir/checkpoint-000011/agent/        the agent (``ActorCritic.save_pretrained``)
    run_dir/checkpoint-000011/trainer.pt    optimizer, random generators
    run_dir/checkpoint-000011/state.json    iteration, KL coefficient, tokens seen, world size
    run_dir/latest                          the name of the newest complete checkpoint
    run_dir/config.json                     the run's configuration (compared on --resume)

A checkpoint is written into a hidden directory, renamed into place, and only
then does ``latest`` move to it (an atomic ``os.replace``), so a run killed at any
moment resumes from a complete checkpoint. The run keeps its two newest
checkpoints: when the newest is damaged (a truncated file, a disk error), resume
falls back to the one before and says so. Only checkpoints this run wrote are
ever deleted.

``trainer.pt`` holds tensors, dicts, numbers and generator states only, and is
read with ``weights_only=True``: a planted pickle cannot run code. ``latest`` may
only name a checkpoint directory inside the run directory.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open

CHECKPOINT_NAME = re.compile(r"checkpoint-\d{6}")
KEEP = 2  # the newest checkpoint and the one before it


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back; the message names the file."""


@dataclass
class TrainerState:
    """What a checkpoint records besides weights and optimizer."""

    iteration: int  # the last iteration the checkpoint covers
    kl_coef: float
    tokens: int  # response tokens generated so far, all ranks
    world_size: int


@dataclass
class Resumed:
    """A checkpoint, read back and checked."""

    directory: Path
    state: TrainerState
    optimizer: dict
    generators: list  # per rank: [sampling state, shuffling state]


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.written: list[Path] = []  # this run's checkpoints, oldest first

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or None when there is no pointer."""
        pointer = self.run_dir / "latest"
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not CHECKPOINT_NAME.fullmatch(name):
            raise ValueError(
                f"{pointer} names {name!r}, which is not a checkpoint directory of this run (checkpoint-NNNNNN); "
                "it may have been edited by hand: fix it or remove it"
            )
        return self.run_dir / name

    def path(self, iteration: int) -> Path:
        """Where the checkpoint of ``iteration`` goes."""
        return self.run_dir / f"checkpoint-{iteration:06d}"

    def save(self, iteration: int, agent, optimizer: dict, generators: list, state: TrainerState):
        """Write checkpoint-<iteration>, point ``latest`` at it atomically, then drop this run's older ones."""
        if not math.isfinite(state.kl_coef):
            raise FloatingPointError(f"the KL coefficient is {state.kl_coef}; not writing a checkpoint of it")
        bad = [name for name, p in agent.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise FloatingPointError(
                f"parameter {bad[0]} (and {len(bad) - 1} more) holds NaN or inf after iteration {iteration}; not "
                f"writing a checkpoint of it. The previous checkpoint is kept: {self.latest()}"
            )
        target = self.path(iteration)
        partial = self.run_dir / f".partial-checkpoint-{iteration:06d}"
        shutil.rmtree(partial, ignore_errors=True)
        agent.save_pretrained(partial / "agent")
        torch.save({"optimizer": optimizer, "generators": generators}, partial / "trainer.pt")
        (partial / "state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(partial, target)
        pointer = self.run_dir / "latest.tmp"
        pointer.write_text(target.name)
        os.replace(pointer, self.run_dir / "latest")
        self.written = [path for path in self.written if path != target] + [target]
        for old in self.written[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        self.written = self.written[-KEEP:]

    def resume(self) -> Resumed:
        """Read the latest checkpoint back, or the one before it when the latest is damaged."""
        latest = self.latest()
        if latest is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {self.run_dir} (no 'latest' file); start without --resume"
            )
        candidates = [latest] + sorted(
            (p for p in self.run_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name) and p.name < latest.name),
            reverse=True,
        )[: KEEP - 1]
        errors = []
        for directory in candidates:
            try:
                resumed = read_checkpoint(directory)
            except CheckpointError as error:
                errors.append(str(error))
                continue
            if errors:
                warnings.warn(f"{errors[0]}; resuming from the checkpoint before it, {directory}", stacklevel=2)
            self.written = sorted(candidates, key=lambda p: p.name)
            return resumed
        raise CheckpointError("; ".join(errors) + "; no complete checkpoint to resume from")


def read_checkpoint(directory: Path) -> Resumed:
    """Every file of a checkpoint, read and checked; a missing or damaged one raises ``CheckpointError``."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is missing")
    path = directory / "state.json"
    try:
        state = TrainerState(**json.loads(path.read_text()))
        if not math.isfinite(state.kl_coef) or state.kl_coef < 0:
            raise ValueError(f"kl_coef is {state.kl_coef}")
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is damaged ({error})") from error
    path = directory / "trainer.pt"
    try:
        trainer = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; a pickle with code is refused here too
        raise CheckpointError(f"{path} cannot be read safely ({type(error).__name__}: {error})") from error
    weights = sorted((directory / "agent").rglob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{directory / 'agent'} holds no weights (*.safetensors)")
    for path in weights:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except Exception as error:  # safetensors raises its own error types for a truncated or corrupt file
            raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error})") from error
    return Resumed(directory, state, trainer["optimizer"], trainer["generators"])
