"""SB3's PPO and A2C, unchanged, with ``"MultiInputPolicy"`` on ``gym.make("TokenRLHF-v0")``.

    python examples/sb3_ppo_mlp.py --steps 16384 --seed 0 --out runs/sb3_ppo_mlp

Nothing here is specific to language models: SB3 wraps the env in ``Monitor`` and
``DummyVecEnv`` and trains its default MLP policy (token ids and mask flattened into
floats, 446 actions) from scratch, with SB3's default hyperparameters. The env gets
no policy, so its reward is KL source 3: ``kl_coef * log pi_ref(a|s)`` per token plus
the reward model's score on the last token (``--ent-coef 0.05`` adds the entropy
bonus that, with the conditions and caveat in docs/sb3.md, turns it into the
KL-regularised objective).

Metric: mean episode return (the env's reward summed over an episode: what SB3
maximises), plus mean score, positive rate (score > 0), EOS rate and response
length, over ``--eval-episodes`` episodes of the held-out eval prompts, for the
trained PPO and A2C policies (sampling, not greedy) and for a uniform-random policy
on the same prompts. An MLP on token ids cannot write reviews; what it can learn
is which tokens to emit regardless of context (tokens the reference model finds
likely, and EOS soon), which is what the return measures. Results go to
``--out/sb3_ppo_mlp.json``.
"""

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from stable_baselines3 import A2C, PPO
from transformers.utils import logging as hf_logging

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.evaluate import episode_metrics
from textenv.default_task import load_prompts

ENV_ID = "TokenRLHF-v0"


@dataclass
class Args:
    """Options of examples/sb3_ppo_mlp.py."""

    steps: int = 16384
    """Training timesteps (tokens) per algorithm."""
    seed: int = 0
    """Seed of SB3 and of the random policy; the evaluation uses seed + 1000."""
    out: Path = Path("runs/sb3_ppo_mlp")
    """Where the JSON goes."""
    eval_episodes: int = 100
    """Episodes of the held-out eval prompts per policy."""
    ent_coef: float = 0.0
    """SB3's entropy bonus (default: SB3's, 0)."""
    algos: list[Literal["ppo", "a2c"]] = field(default_factory=lambda: ["ppo", "a2c"])
    """SB3 algorithms to train."""
    threads: int = 1
    """Torch intra-op threads (0: torch's default). 1 by default: for these tiny models on a shared 2-core machine,
    two threads that wait on each other were several times slower."""


def evaluate(env: gym.Env, act, episodes: int, seed: int) -> dict[str, float]:
    """Run ``episodes`` episodes with ``act(observation) -> token``; the prompt sequence depends only on ``seed``."""
    returns, scores, lengths, eos = [], [], [], []
    observation, _ = env.reset(seed=seed)
    for episode in range(episodes):
        if episode:
            observation, _ = env.reset()
        total, steps, terminated, truncated = 0.0, 0, False, False
        while not (terminated or truncated):
            observation, reward, terminated, truncated, info = env.step(act(observation))
            total, steps = total + reward, steps + 1
        returns.append(total)
        scores.append(info["score"])
        lengths.append(steps)
        eos.append(terminated)
    # the env has no policy here (KL source 3): it reports no KL, so none is measured
    no_kl = torch.full((episodes,), float("nan"))
    metrics = episode_metrics(
        torch.tensor(scores, dtype=torch.float64), no_kl, torch.tensor(lengths), torch.tensor(eos), "eval"
    )
    return {"return": float(np.mean(returns))} | {
        key: metrics[f"eval/{key}"] for key in ("score", "score_std", "positive_rate", "eos_rate", "response_length")
    }


def main() -> None:
    args = tyro.cli(Args, description=__doc__)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    eval_env = gym.make(ENV_ID, prompts=load_prompts("eval"))
    eval_seed = args.seed + 1000
    rng = np.random.default_rng(args.seed)
    vocab = int(eval_env.action_space.n)
    results = {"uniform random": evaluate(eval_env, lambda _: int(rng.integers(vocab)), args.eval_episodes, eval_seed)}
    results["uniform random"]["train_seconds"] = 0.0
    for name, algo in (("ppo", PPO), ("a2c", A2C)):
        if name not in args.algos:
            continue
        env = gym.make(ENV_ID)  # unchanged: the default task, default arguments
        model = algo("MultiInputPolicy", env, seed=args.seed, ent_coef=args.ent_coef, verbose=0)
        start = time.perf_counter()
        model.learn(args.steps)
        seconds = time.perf_counter() - start
        torch.manual_seed(args.seed)
        result = evaluate(
            eval_env, lambda o, m=model: int(m.predict(o, deterministic=False)[0]), args.eval_episodes, eval_seed
        )
        result["train_seconds"] = seconds
        results[f"SB3 {name.upper()} MultiInputPolicy, {args.steps} steps"] = result
        env.close()
    eval_env.close()

    lines = [
        "| policy | mean return | mean score | positive | EOS rate | length | train time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['return']:.2f} | {r['score']:.2f} | {r['positive_rate']:.0%} | {r['eos_rate']:.0%} | "
            f"{r['response_length']:.1f} | {r['train_seconds']:.0f} |"
        )
    config = {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(args).items()}
    payload = {"config": config, "torch_threads": torch.get_num_threads(), "results": results}
    (args.out / "sb3_ppo_mlp.json").write_text(json.dumps(payload, indent=2))
    print("\n".join(lines))
    print(f"\n{args.eval_episodes} episodes of the eval prompts each; results: {args.out / 'sb3_ppo_mlp.json'}")


if __name__ == "__main__":
    main()
