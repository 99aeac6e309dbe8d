"""An LM head's logits with and without ``textenv.vocabulary``'s blocks, in GFLOP/s on the CPU.

    python benchmarks/vocabulary_blocks.py
    python benchmarks/vocabulary_blocks.py --json docs/results/vocabulary_blocks.json

For N tokens of width D and a vocabulary of V (GPT-2-small's 768 and 50,257 by default),
the logits (N, D) x (D, V) as ``F.linear`` computes them and as ``vocabulary_linear`` does,
in blocks of ``BLOCK`` vocabulary rows; and for reference the backward's two products at
the same sizes, which stay torch's own: the hidden states' gradient (N, V) x (V, D) and
the weight's (V, N) x (N, D).

N = 16 is a rollout step's batch (``ppo_iteration.py``'s 16 episodes), 128 a GPT-2-small
micro-batch's response tokens (4 episodes x 32), 512 a larger one (a single row, one env's
step, is a matrix-vector product, which ``vocabulary_linear`` leaves to torch). Each
figure is the best of ``--repeats`` after a warm-up, one torch thread; the blocked logits
are compared with ``F.linear``'s to the bit. The load average is printed: compare within
one run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro


@dataclass
class BlocksArgs:
    tokens: list[int] = field(default_factory=lambda: [16, 128, 512])
    """N, the rows of the products."""
    width: int = 768
    vocabulary: int = 50257
    repeats: int = 5
    threads: int = 1
    seed: int = 0
    json: Path | None = None
    """Write the figures to this JSON file."""


def best_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(BlocksArgs, args=argv, description=__doc__)
    import torch
    import torch.nn.functional as F

    from textenv.vocabulary import BLOCK, vocabulary_linear

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(args.vocabulary, args.width, generator=generator) * 0.02
    print(
        f"LM head {args.vocabulary:,} x {args.width}, blocks of {BLOCK} rows; best of {args.repeats}; "
        f"torch {torch.__version__}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'tokens':>6s} {'product':12s} {'torch GFLOP/s':>14s} {'blocked':>8s} {'x faster':>9s}  same floats")
    rows = []
    for n in args.tokens:
        x = torch.randn(n, args.width, generator=generator)
        grad = torch.randn(n, args.vocabulary, generator=generator)
        flops = 2 * n * args.width * args.vocabulary
        plain_s = best_seconds(lambda x=x: F.linear(x, weight), args.repeats)
        blocked_s = best_seconds(lambda x=x: vocabulary_linear(x, weight), args.repeats)
        logits = {
            "tokens": n,
            "product": "logits",
            "torch_gflops": flops / plain_s / 1e9,
            "blocked_gflops": flops / blocked_s / 1e9,
            "speedup": plain_s / blocked_s,
            "same_floats": torch.equal(F.linear(x, weight), vocabulary_linear(x, weight)),
        }
        backward = {"input grad": lambda g=grad: g.mm(weight), "weight grad": lambda g=grad, x=x: g.t().mm(x)}
        rows += [logits] + [
            {"tokens": n, "product": name, "torch_gflops": flops / best_seconds(product, args.repeats) / 1e9}
            for name, product in backward.items()
        ]
        for row in rows[-3:]:
            blocked_text = (
                f"{row['blocked_gflops']:8.1f} {row['speedup']:9.2f}  {row['same_floats']}"
                if "speedup" in row
                else f"{'-':>8s} {'-':>9s}  -"
            )
            print(f"{n:6d} {row['product']:12s} {row['torch_gflops']:14.1f} {blocked_text}")
    if args.json is not None:
        report = {
            "command": "python benchmarks/vocabulary_blocks.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "threads": args.threads,
            "repeats": args.repeats,
            "block": BLOCK,
            "width": args.width,
            "vocabulary": args.vocabulary,
            "load_average": round(os.getloadavg()[0], 2),
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
