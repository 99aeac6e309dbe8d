"""How far the bf16 env's rewards are from an uncached bf16 recomputation, on this CPU's bf16 kernels.

    python benchmarks/bf16_exactness.py [--emulate] [--json docs/results/bf16_exactness.json]

The scripted episodes of ``tests/textenv/test_bf16.py`` (5 envs of the default task at ``precision='bf16'``,
45 steps with a reset every 3, for each of ``--seeds``): for every finished episode the env's reference
log-probs, score and per-step rewards against plain full-sequence forwards of the same bf16 reference and reward
models (no cache, no padding, a batch of one). Prints and records the largest and the mean absolute differences.

The kernels are oneDNN's native bf16 ones on a CPU with AVX512-BF16 or AMX; ``--emulate`` runs where the CPU has
neither (textenv refuses bf16 there; this passes the refusal, as the tests do, and torch's own bf16 kernels run).
The result is recorded under the kernels' name, ``native`` or ``emulated``, beside what the JSON already holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(seeds: list[int]) -> dict:
    from gymnasium.vector import AutoresetMode

    from tests.conftest import new_vec
    from tests.textenv.test_bf16 import load_bf16_models, scripted_episodes, uncached_figures
    from tests.textenv.test_core import SETTINGS

    tokenizer, reference, reward_model = load_bf16_models()
    logprob, score, reward = [], [], []
    for seed in seeds:
        env = new_vec(5, autoreset_mode=AutoresetMode.DISABLED, precision="bf16", **SETTINGS)
        for episode in scripted_episodes(env, tokenizer, seed):
            ref, expected_score, rewards = uncached_figures(episode, reference, reward_model)
            logprob.append(np.abs(np.array(episode.ref_logprobs) - ref))
            score.append(abs(episode.score - expected_score))
            reward.append(np.abs(np.array(episode.rewards) - rewards))
    steps = np.concatenate(logprob)
    return {
        "episodes": len(score),
        "steps": int(steps.size),
        "ref_logprob_max": float(steps.max()),
        "ref_logprob_mean": float(steps.mean()),
        "score_max": float(max(score)),
        "reward_max": float(np.concatenate(reward).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emulate", action="store_true", help="run bf16 on a CPU without AVX512-BF16 or AMX")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--json", type=Path, help="record the figures here, under 'native' or 'emulated'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from textenv.config import bf16_supported

    native = bf16_supported(torch.device("cpu"))
    if not native and not args.emulate:
        parser.error("this CPU has neither AVX512-BF16 nor AMX: pass --emulate to run torch's bf16 kernels")
    if native and args.emulate:
        parser.error("--emulate: this CPU runs bf16 natively (AVX512-BF16 or AMX); drop --emulate")
    if args.emulate:
        torch.cpu._is_avx512_bf16_supported = lambda: True  # the check textenv.config.bf16_supported reads
    kernels = "native" if native else "emulated"
    figures = measure(args.seeds) | {"seeds": args.seeds}
    print(f"{kernels} bf16 kernels: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items() if k != "seeds"))
    if args.json:
        report = json.loads(args.json.read_text()) if args.json.is_file() else {}
        report[kernels] = figures | {"command": "python benchmarks/bf16_exactness.py " + " ".join(sys.argv[1:])}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
