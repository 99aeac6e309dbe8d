"""``python -m agents`` (or ``textenv-train``): train a policy with PPO on TokenRLHF-v0.

With no flags it trains the embedded default task's SFT policy to write positive
reviews; ``--policy``, ``--reward-model`` and ``--prompts`` take your own models
(local directories or hub names) and prompts (a text file). ``--reward-fn mod:f``
imports ``mod`` from the working folder or the installed packages, under either
command (the working folder comes first, as with ``python -m``).
"""

from __future__ import annotations

import os
import sys
import traceback

from transformers.utils import logging as hf_logging

from agents.logger import summary
from agents.train import TrainingFailed, TrainingStopped, cli, train
from textenv.reward_fns import import_from_working_directory


def main(argv: list[str] | None = None) -> None:
    import_from_working_directory()  # textenv-train imports --reward-fn mod:f from the working folder, as -m does
    hf_logging.disable_progress_bar()
    try:
        config = cli(argv, description=__doc__)
        final = train(config)
    except TrainingStopped as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    except TrainingFailed as failed:  # what raised, and how to continue; a traceback only for textenv's own errors
        if failed.internal:
            traceback.print_exception(failed.__cause__, file=sys.stderr)
        print(f"error: {failed}", file=sys.stderr)
        sys.exit(failed.exit_code)
    except (ValueError, TypeError, OSError, ImportError) as error:  # bad settings or files: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    print(summary(config.run.run_dir))
    print(f"\nfinal policy: {final}  (AutoModelForCausalLM.from_pretrained loads it)")
    print(f"learning curve: {config.run.run_dir / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
