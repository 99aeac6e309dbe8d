"""Checkpoints of a training run: written atomically, found again, resumed from.

    run_dir/checkpoint-000011/agent/        the agent (``ActorCritic.save_pretrained``)
    run_dir/checkpoint-000011/trainer.pt    optimizer, LR scheduler, random generators
    run_dir/checkpoint-000011/state.json    iteration, KL coefficient, tokens seen, world size
    run_dir/latest                          the name of the newest complete checkpoint

A checkpoint is written into a hidden directory, renamed into place, and only
then does ``latest`` move to it (an atomic ``os.replace``), so a run killed at any
moment resumes from a complete checkpoint. ``trainer.pt`` holds tensors, dicts,
numbers and generator states only, and is read with ``weights_only=True``: a
planted pickle cannot run code. ``latest`` may only name a checkpoint directory
inside the run directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CHECKPOINT_NAME = re.compile(r"checkpoint-\d{6}")


@dataclass
class TrainerState:
    """What a checkpoint records besides weights and optimizer."""

    iteration: int  # the last iteration the checkpoint covers
    kl_coef: float
    tokens: int  # response tokens generated so far, all ranks
    world_size: int


@dataclass
class Resumed:
    """A checkpoint, read back."""

    directory: Path
    state: TrainerState
    optimizer: dict
    scheduler: dict
    generators: list  # per rank: [sampling state, shuffling state]


class Checkpoints:
    """The checkpoints of one run directory. Deletes only checkpoints this run wrote (or resumed from)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.current: Path | None = None  # the newest checkpoint of this run

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

    def save(self, iteration: int, agent, optimizer: dict, scheduler: dict, generators: list, state: TrainerState):
        """Write checkpoint-<iteration>, point ``latest`` at it atomically, then drop this run's previous one."""
        target = self.run_dir / f"checkpoint-{iteration:06d}"
        partial = self.run_dir / f".partial-checkpoint-{iteration:06d}"
        shutil.rmtree(partial, ignore_errors=True)
        agent.save_pretrained(partial / "agent")
        torch.save({"optimizer": optimizer, "scheduler": scheduler, "generators": generators}, partial / "trainer.pt")
        (partial / "state.json").write_text(json.dumps(asdict(state)))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(partial, target)
        pointer = self.run_dir / "latest.tmp"
        pointer.write_text(target.name)
        os.replace(pointer, self.run_dir / "latest")
        if self.current is not None and self.current != target:
            shutil.rmtree(self.current, ignore_errors=True)
        self.current = target

    def resume(self) -> Resumed:
        """Read the latest checkpoint back; it becomes this run's own."""
        directory = self.latest()
        if directory is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {self.run_dir} (no 'latest' file); start without --resume"
            )
        state = TrainerState(**json.loads((directory / "state.json").read_text()))
        trainer = torch.load(directory / "trainer.pt", weights_only=True)
        self.current = directory
        return Resumed(directory, state, trainer["optimizer"], trainer["scheduler"], trainer["generators"])
