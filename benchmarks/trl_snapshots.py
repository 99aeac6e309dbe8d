"""TRL's PPO trainer through the peer harness, with the policy saved after chosen updates.

Run with TRL's own interpreter (the harness's virtual environment), not textenv's:

    ../trl-venv/bin/python benchmarks/trl_snapshots.py --save-at 10 30 --out DIR -- HARNESS FLAGS

Each update U of ``--save-at`` writes the policy TRL is training, and its tokenizer, to ``DIR/update_U``
(Hugging Face format) right after that update, inside one run: the learning-rate schedule is the
whole run's, as in a textenv run evaluated mid-way. ``benchmarks/critic_ev.py`` evaluates the snapshots
with ``python -m agents.evaluate``. Everything after ``--`` goes to the harness
(``trl_ppo_bench.py``, beside textenv's checkout in ``shared/peers``; ``--harness`` names another).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "shared" / "peers" / "trl_ppo_bench.py"
"""The peer harness, beside textenv's checkout; ``ppo_iteration.py`` and ``critic_ev.py`` run it too."""


def harness_flags(
    policy: str,
    reward: str,
    prompts: str,
    *,
    updates: int,
    batch_size: int,
    minibatch_size: int,
    threads: int,
    seed: int,
) -> list[str]:
    """The harness's flags for textenv's PPO shape and settings: responses of at most 32 tokens ending at EOS,
    prompts of at most 16, 4 epochs over minibatches of ``minibatch_size``, lr 3e-4, KL coefficient 0.05,
    temperature 1."""
    return [
        *("--policy", policy, "--reward", reward, "--prompts", prompts),
        *("--updates", str(updates), "--batch-size", str(batch_size), "--response-length", "32"),
        *("--num-ppo-epochs", "4", "--num-mini-batches", str(batch_size // minibatch_size)),
        *("--max-prompt-length", "16", "--lr", "3e-4", "--kl-coef", "0.05", "--temperature", "1.0"),
        *("--stop-eos", "--threads", str(threads), "--seed", str(seed)),
    ]


def load_harness(path: Path):
    if not path.is_file():
        raise SystemExit(f"--harness: {path} is not a file; pass the path of trl_ppo_bench.py")
    spec = importlib.util.spec_from_file_location("trl_ppo_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-at", type=int, nargs="+", required=True, help="the updates (from 1) to save after")
    parser.add_argument("--out", type=Path, required=True, help="a new or empty directory for the snapshots")
    parser.add_argument("--harness", type=Path, default=HARNESS)
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then the harness's flags")
    args = parser.parse_args()
    if any(u < 1 for u in args.save_at):
        parser.error(f"--save-at: updates count from 1; got {args.save_at}")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out: {args.out} is not empty; name a new directory")
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    harness = load_harness(args.harness)
    save_at = set(args.save_at)

    class SavingTimer(harness.UpdateTimer):
        """The harness's timer, saving the policy after the updates asked for (after the timing of that update)."""

        def on_step_end(self, run_args, state, control, model=None, processing_class=None, **kw):
            super().on_step_end(run_args, state, control, **kw)
            if state.global_step in save_at:
                target = args.out / f"update_{state.global_step}"
                getattr(model, "module", model).policy.save_pretrained(target)
                processing_class.save_pretrained(target)

    harness.UpdateTimer = SavingTimer
    sys.argv = [str(args.harness), *flags]
    harness.main()
    missing = sorted(u for u in save_at if not (args.out / f"update_{u}").is_dir())
    if missing:
        raise SystemExit(f"--save-at: the run ended before update(s) {missing}; raise the harness's --updates")


if __name__ == "__main__":
    main()
