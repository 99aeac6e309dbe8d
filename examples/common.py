"""What the examples share: arguments, the env, a briefly trained agent, tables, JSON and figures.

Everything runs on the embedded default task (offline, CPU). Most examples want an
actor that has drifted a little from the reference (else the KL penalty is 0) and
a critic that has learned something (else every value is 0): ``warm_agent`` runs
the real training loop, ``agents.train.train``, for a few iterations (a few
seconds) and caches the result in OUT/warm_agent_<iterations>.

Each example's options are a dataclass that extends ``ExampleArgs``, read with
``parse_args`` (tyro), which also calls ``setup``; importing this module changes
no global state. Figures are ``matplotlib.figure.Figure`` objects saved straight
to files, so no pyplot backend is involved.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import tyro
from matplotlib.figure import Figure
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.policy import ActorCritic
from agents.rollout import Rollout, collect_rollout, make_rollout_env
from agents.train import TrainConfig, train
from textenv.default_task import POLICY_DIR

DEFAULT_OUT = Path(__file__).resolve().parent / "output"
WARM_ITERATIONS = 6


@dataclass
class ExampleArgs:
    """The options every example has; an example with more extends it."""

    out: Path = DEFAULT_OUT
    """Where figures and JSON go."""
    seed: int = 0
    """Seed of the sampled episodes."""


ArgsT = TypeVar("ArgsT", bound=ExampleArgs)


def setup() -> None:
    """The process-wide settings of the examples: quiet Hugging Face loading, one torch thread."""
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # the models are tiny: one thread is as fast, and robust to a busy machine


def parse_args(args_type: type[ArgsT], doc: str) -> ArgsT:
    """Read the example's options from the command line (``doc`` heads --help), then ``setup``, create OUT and seed."""
    args = tyro.cli(args_type, description=doc)
    setup()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return args


def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


def token_strings(tok, ids) -> list[str]:
    """Readable tokens: '▁great' (a word start) -> 'great'; specials stay '<eos>'."""
    return [t.replace("▁", "") or t for t in tok.convert_ids_to_tokens([int(i) for i in ids])]


def make_env(num_envs: int, max_new_tokens: int = 32, **kwargs):
    """The lockstep batch of episodes a PPO rollout uses (``agents.rollout.make_rollout_env``), on the CPU."""
    return make_rollout_env(num_envs, max_new_tokens=max_new_tokens, device="cpu", **kwargs)


def rollout(agent: ActorCritic, env, seed: int) -> Rollout:
    """One lockstep batch of episodes, every token sampled by ``agent`` (``agents.rollout.collect_rollout``)."""
    return collect_rollout(agent, env, temperature=1.0, seed=seed, generator=torch.Generator().manual_seed(seed))


def sft_agent() -> ActorCritic:
    """The agent before any RL: the SFT model as actor, a zero-initialised value head as critic."""
    return ActorCritic.from_models(POLICY_DIR).eval()


def warm_agent(out: Path, iterations: int = WARM_ITERATIONS) -> ActorCritic:
    """The agent after ``iterations`` of the real PPO loop (32 episodes each, seed 0), trained once, then cached."""
    run_dir = Path(out) / f"warm_agent_{iterations}"
    if not (run_dir / "final" / "value_head.safetensors").exists():
        print(f"training the warm agent: {iterations} PPO iterations of agents.train.train -> {run_dir}")
        partial = Path(out) / f".warm_agent_{iterations}.{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        config = TrainConfig()
        config.run.iterations, config.run.batch_size, config.run.seed, config.run.device = iterations, 32, 0, "cpu"
        config.run.eval_every, config.run.eval_episodes, config.run.checkpoint_every = 10**6, 8, 10**6
        config.run.run_dir, config.run.progress = partial, False
        config.ppo.minibatch_size = config.ppo.micro_batch_size = 16
        # the critic as the examples teach it: the value head alone (the library's default on this task adds the
        # reward model's score of each prefix to it, docs/design.md; examples 12 and 13 train with that default)
        config.run.value_prior = "none"
        train(config)
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(partial, run_dir)
    return ActorCritic.from_pretrained(run_dir / "final").eval()


def warm_optimizer(agent: ActorCritic, out: Path, run_iterations: int = 20) -> torch.optim.Adam:
    """Adam for ``agent`` as a real run's next update would have it: the moments the warm agent's training left
    (its last checkpoint), at the learning rate a run of ``run_iterations`` has at iteration WARM_ITERATIONS
    (agents.train's linear decay). A fresh Adam would instead move every weight by about the learning rate in its
    first steps, several times further than any update of a real run."""
    from agents.checkpoint import Checkpoints, read_checkpoint
    from agents.ppo import PPOConfig

    base = PPOConfig().learning_rate
    optimizer = torch.optim.Adam(agent.parameters(), lr=base, eps=1e-5)
    checkpoint = Checkpoints(Path(out) / f"warm_agent_{WARM_ITERATIONS}").latest()
    optimizer.load_state_dict(read_checkpoint(checkpoint).optimizer)
    for group in optimizer.param_groups:
        group["lr"] = base * (1 - WARM_ITERATIONS / run_iterations)
    return optimizer


def print_table(rows: list[dict], title: str = "") -> None:
    """Rows of equal keys as aligned columns; floats with sign and 3 decimals."""
    if title:
        print(f"\n{title}")
    if not rows:
        return

    def cell(value) -> str:
        if isinstance(value, bool):
            return "yes" if value else "-"
        if isinstance(value, float):
            return f"{value:+.3f}"
        return str(value)

    columns = list(rows[0])
    cells = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def metric_summary(rows: list[dict], keys: list[str] | None = None) -> dict[str, dict[str, float]]:
    """first, last, min, max (and the iterations of min and max) of each metric over a run's logged rows, and the
    min and max after the first row."""
    summary = {}
    for key in keys or sorted({k for row in rows for k in row if k != "iteration"}):
        points = [(row["iteration"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if points:
            low, high = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
            summary[key] = {"first": points[0][1], "last": points[-1][1], "min": low[1], "max": high[1],
                            "argmin": low[0], "argmax": high[0]}  # fmt: skip
            if len(points) > 1:  # the first row is often special (an untrained critic's values are all 0)
                later = [value for _, value in points[1:]]
                summary[key] |= {"min_after_first": min(later), "max_after_first": max(later)}
    return summary


def save_json(out: Path, name: str, data: dict) -> Path:
    path = Path(out) / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"table: {path}")
    return path


def save_figure(fig: Figure, out: Path, name: str) -> Path:
    path = Path(out) / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure: {path}")
    return path


def token_heatmap(
    ax, values, mask, labels: list[list[str]], title: str, cmap: str = "RdBu", center: bool = True,
    limit: float | None = None,
):  # fmt: skip
    """A (B, T) per-token quantity as a heatmap, each cell labelled with its token; masked cells blank.

    ``limit``: the colour scale's half-width (shared by panels that compare); default the data's largest |value|."""
    import numpy as np

    data = np.ma.masked_array(np.asarray(values, dtype=float), mask=~np.asarray(mask, dtype=bool))
    if limit is None:
        limit = float(np.abs(data).max()) if data.count() else 1.0
    image = ax.imshow(data, cmap=cmap, aspect="auto", vmin=-limit if center else None, vmax=limit if center else None)
    for b, row in enumerate(labels):
        for t, label in enumerate(row):
            dark = center and abs(float(data[b, t])) > 0.6 * limit
            ax.text(t, b, label, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ax.set_title(title)
    ax.set_xlabel("response step t")
    ax.set_ylabel("episode")
    ax.set_yticks(range(len(labels)))
    return image
