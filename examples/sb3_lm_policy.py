"""SB3's own PPO fine-tunes the default task's language model (``LMActorCriticPolicy`` on ``TokenVecEnv``).

    python examples/sb3_lm_policy.py                      # SB3 PPO + LM policy, 16384 tokens
    python examples/sb3_lm_policy.py --compare native mlp # plus the native agent and SB3's MLP policy

The env gets the SB3 policy's log-probs (KL source 2, ``SB3PolicyLogprobs``), so
its reward is ``-kl_coef * (log pi - log pi_ref) + score``. Each env step generates
one token in each of the ``--num-envs`` slots and SB3 counts it as ``num_envs``
timesteps, so ``--steps`` is the number of generated training tokens.

Metric (the README's): on ``--eval-episodes`` episodes of the held-out eval prompts,
sampled at temperature 1, before and after training: positive rate (fraction of
responses the reward model scores > 0), mean score, mean KL per response (summed
per-token ``log pi - log pi_ref``, nats), mean response length; plus training
wall-clock time (SB3: ``model.learn``). ``--compare`` runs, for the same number of
generated tokens: ``native`` (``python -m agents --token-budget STEPS``, the
project's own PPO with a KV cache and an adaptive KL coefficient, evaluated by
itself on the same eval prompts; time: the sum of its iterations, which include
its first evaluation) and ``mlp`` (SB3 PPO with ``"MultiInputPolicy"`` from scratch
on the same env, evaluated here). Results go to ``--out/sb3_lm_policy.json``, the
trained LM (Hugging Face format) to ``--out/sb3_lm_policy_final``.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from gymnasium.vector import AutoresetMode
from stable_baselines3 import PPO
from stable_baselines3.common.utils import obs_as_tensor
from stable_baselines3.common.vec_env import VecMonitor
from transformers.utils import logging as hf_logging

from agents.evaluate import episode_metrics
from agents.sb3 import LMActorCriticPolicy, SB3PolicyLogprobs, TokenVecEnv
from textenv import TokenGenerationVectorEnv
from textenv.default_task import load_prompts

METRICS = ("positive_rate", "score", "score_std", "kl", "response_length", "eos_rate")


@dataclass
class Args:
    """Options of examples/sb3_lm_policy.py."""

    steps: int = 16384
    """Generated training tokens (SB3 timesteps)."""
    seed: int = 0
    """Seed of SB3 (and of the native agent); the evaluation uses seed + 1000."""
    out: Path = Path("runs/sb3_lm_policy")
    """Where the JSON, the trained LM and the native run go."""
    num_envs: int = 16
    """Slots of the batched env (one token each per env step)."""
    n_steps: int = 64
    """SB3 rollout length per slot."""
    epochs: int = 4
    """PPO epochs per rollout."""
    minibatches: int = 4
    """Minibatches per epoch."""
    lr: float = 3e-4
    """Learning rate, decayed linearly to 0."""
    kl_coef: float = 0.05
    """KL penalty coefficient of the env's reward."""
    max_new_tokens: int = 32
    """Longest response, in tokens."""
    eval_episodes: int = 128
    """Episodes of the held-out eval prompts, before and after training."""
    threads: int = 1
    """Torch intra-op threads (0: torch's default). 1 by default: for these tiny models on a shared 2-core machine,
    two threads that wait on each other were several times slower."""
    compare: list[Literal["native", "mlp"]] = field(default_factory=list)
    """Also run, for the same token budget: native (python -m agents), mlp (SB3 PPO with "MultiInputPolicy")."""


@torch.no_grad()
def evaluate(policy, episodes: int, seed: int, kl_coef: float, max_new_tokens: int) -> dict[str, float]:
    """Sample ``episodes`` responses to eval prompts from an SB3 policy, in one lockstep batch."""
    env = TokenGenerationVectorEnv(
        num_envs=episodes,
        autoreset_mode=AutoresetMode.DISABLED,
        prompts=load_prompts("eval"),
        policy=SB3PolicyLogprobs(policy),
        kl_coef=kl_coef,
        max_new_tokens=max_new_tokens,
    )
    policy.set_training_mode(False)
    torch.manual_seed(seed)
    observation, _ = env.reset(seed=seed)
    kl, length = np.zeros(episodes), np.zeros(episodes)
    score, ended_with_eos = np.full(episodes, np.nan), np.zeros(episodes, dtype=bool)
    done = np.zeros(episodes, dtype=bool)
    while not done.all():
        actions, _, _ = policy(obs_as_tensor(observation, policy.device))
        observation, _, terminated, truncated, info = env.step(actions.cpu().numpy())
        live = ~done
        kl[live] += np.nan_to_num(info["kl"][live])
        length[live] += 1
        ended = terminated | truncated
        score[ended] = info["score"][ended]
        ended_with_eos |= terminated
        done |= ended
    env.close()
    metrics = episode_metrics(
        torch.as_tensor(score), torch.as_tensor(kl), torch.as_tensor(length), torch.as_tensor(ended_with_eos), "eval"
    )
    return {key: metrics[f"eval/{key}"] for key in METRICS}


def make_ppo(policy, env, args: Args, **policy_kwargs) -> PPO:
    """SB3 PPO with the native agent's settings where SB3 has them (gamma 1, GAE 0.95, clip 0.2, ...)."""
    rollout = args.num_envs * args.n_steps
    return PPO(
        policy,
        env,
        n_steps=args.n_steps,
        batch_size=rollout // args.minibatches,
        n_epochs=args.epochs,
        learning_rate=lambda progress: args.lr * progress,  # linear decay to 0, as the native agent
        gamma=1.0,
        gae_lambda=0.95,
        clip_range=0.2,
        clip_range_vf=0.2,
        vf_coef=0.1,
        ent_coef=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        policy_kwargs=policy_kwargs or None,
        verbose=0,
    )


def train_sb3(kind: str, args: Args) -> dict:
    kl = SB3PolicyLogprobs()
    env = VecMonitor(
        TokenVecEnv(num_envs=args.num_envs, policy=kl, kl_coef=args.kl_coef, max_new_tokens=args.max_new_tokens)
    )
    if kind == "lm":
        model = make_ppo(LMActorCriticPolicy, env, args, temperature=1.0)
    else:
        model = make_ppo("MultiInputPolicy", env, args)
    kl.policy = model.policy
    evaluation = dict(episodes=args.eval_episodes, seed=args.seed + 1000, kl_coef=args.kl_coef)
    evaluation["max_new_tokens"] = args.max_new_tokens
    before = evaluate(model.policy, **evaluation)
    start = time.perf_counter()
    model.learn(args.steps)
    seconds = time.perf_counter() - start
    after = evaluate(model.policy, **evaluation)
    result = {"before": before, "after": after, "train_seconds": seconds, "tokens": int(model.num_timesteps)}
    if kind == "lm":
        model.policy.save_pretrained(args.out / "sb3_lm_policy_final")
        result["final_policy"] = str(args.out / "sb3_lm_policy_final")
    env.close()
    return result


def run_native(args: Args) -> dict:
    """``python -m agents`` with the same token budget; its own eval on the same eval prompts."""
    run_dir = args.out / "sb3_lm_policy_native"
    command = [sys.executable, "-m", "agents", "--run-dir", str(run_dir), "--token-budget", str(args.steps)]
    command += ["--iterations", "100000", "--seed", str(args.seed), "--no-progress"]
    command += ["--eval-episodes", str(args.eval_episodes), "--eval-every", "100000"]
    command += ["--max-new-tokens", str(args.max_new_tokens), "--kl-coef", str(args.kl_coef)]
    environment = dict(os.environ)
    if args.threads:
        environment["OMP_NUM_THREADS"] = str(args.threads)  # torch's default thread count
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=environment)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [row for row in rows if "eval/score" in row]
    tokens = [row["perf/tokens_total"] for row in rows if "perf/tokens_total" in row]

    def pick(row):
        return {key: row.get(f"eval/{key}") for key in METRICS}

    return {
        "before": pick(evals[0]),
        "after": pick(evals[-1]),
        # its iterations (rollout + update, and the first evaluation); the whole command took command_seconds
        "train_seconds": sum(row.get("perf/iteration_s", 0.0) for row in rows),
        "command_seconds": seconds,
        "tokens": tokens[-1] if tokens else None,
        "command": " ".join(command),
    }


def table(results: dict) -> str:
    lines = [
        "| run | tokens | positive before | positive after | score after | KL before | KL after | length after "
        "| train time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        b, a = r["before"], r["after"]
        lines.append(
            f"| {name} | {r['tokens']} | {b['positive_rate']:.1%} | {a['positive_rate']:.1%} | {a['score']:.2f} | "
            f"{b['kl']:.2f} | {a['kl']:.2f} | {a['response_length']:.1f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = tyro.cli(Args, description=__doc__)
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    results = {"SB3 PPO + LMActorCriticPolicy": train_sb3("lm", args)}
    if "mlp" in args.compare:
        results["SB3 PPO + MultiInputPolicy (MLP)"] = train_sb3("mlp", args)
    if "native" in args.compare:
        results["native agent (python -m agents)"] = run_native(args)
    config = {key: str(value) if isinstance(value, Path) else value for key, value in dataclasses.asdict(args).items()}
    payload = {"config": config, "torch_threads": torch.get_num_threads(), "results": results}
    (args.out / "sb3_lm_policy.json").write_text(json.dumps(payload, indent=2))
    print(table(results))
    print(f"\nresults: {args.out / 'sb3_lm_policy.json'}")


if __name__ == "__main__":
    main()
