"""Where one PPO iteration's time goes, op by op: torch.profiler over a rollout and an update.

    python benchmarks/profile_iteration.py --shape gpt2-small
    python benchmarks/profile_iteration.py --shape default --critic separate

Builds the models of ``ppo_iteration.py``'s shape (the default task, or the GPT-2-small-shaped
pair with a 50,257-entry vocabulary, random init, in a temporary directory), runs one
iteration to warm up (Adam's state exists from then on), then profiles the next rollout and
the update on it, and prints for each the ops with the most self CPU time and the share of
matrix products (``aten::mm``, ``addmm``, ``bmm``, ``linear``'s kernels): the arithmetic any
exact implementation of the same iteration has to do, against everything else.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation")


@dataclass
class ProfileArgs:
    shape: Literal["default", "gpt2-small"] = "gpt2-small"
    """The models and batch of ``ppo_iteration.py``'s shape of that name."""
    critic: Literal["shared", "separate"] = "shared"
    """The shared critic, or ``--no-share-backbone``."""
    threads: int = 1
    """torch's CPU threads."""
    rows: int = 15
    """Ops listed per phase."""
    seed: int = 0


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(ProfileArgs, args=argv, description=__doc__)
    import torch
    from ppo_iteration import BenchmarkArgs, build_gpt2_small, default_task, textenv_spec, train_config
    from torch.profiler import ProfilerActivity, profile

    from agents.ppo import ppo_update
    from agents.rollout import collect_rollout
    from agents.train import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_iteration_") as tmp:
        benchmark = BenchmarkArgs(seed=args.seed, threads=args.threads)
        task = default_task(benchmark) if args.shape == "default" else build_gpt2_small(Path(tmp), args.seed)
        spec = textenv_spec(task, args.critic, benchmark) | {"updates": 10}  # ppo_iteration.py's run, unlooped
        config = train_config(spec, Path(tmp) / "run")
        trainer = Trainer(config)
        ppo = config.ppo

        def rollout(iteration: int):
            trainer.agent.eval()
            return collect_rollout(trainer.agent, trainer.env, 1.0, iteration, trainer.sampling, trainer.autocast)

        def update(batch) -> None:
            trainer.model.train()
            model, optimizer = trainer.model, trainer.optimizer
            ppo_update(model, optimizer, batch, ppo, 1.0, trainer.shuffling, kl_coef=0.05, max_new_tokens=32)

        update(rollout(0))  # warm-up: Adam's state, the packing probe, lazy imports
        print(
            f"{args.shape}, {args.critic} critic, {task.batch_size} episodes x at most 32 tokens, "
            f"minibatches of {task.minibatch_size}, 4 epochs; torch {torch.__version__}, {args.threads} thread(s)"
        )
        batch = None
        for phase in ("rollout", "update"):
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                if phase == "rollout":
                    batch = rollout(1)
                else:
                    update(batch)
            wall = time.perf_counter() - start
            ops = prof.key_averages()
            total = sum(op.self_cpu_time_total for op in ops) / 1e6
            matmul = sum(op.self_cpu_time_total for op in ops if op.key in MATMULS) / 1e6
            print(
                f"\n{phase}: {wall:.2f} s wall under the profiler; self CPU {total:.2f} s, of which matrix "
                f"products {matmul:.2f} s ({matmul / total:.0%})"
            )
            print(ops.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48))


if __name__ == "__main__":
    main()
