"""Evaluate a policy on a task's held-out prompts: the one place evaluation metrics are computed.

    python -m agents.evaluate --task arithmetic                       # the task's SFT model
    python -m agents.evaluate --task arithmetic --policy runs/grpo/final --json eval.json

Every eval prompt is answered ``k`` times (sampled at the env's temperature, each
episode an ordinary env episode: the KL to the reference and every reward term are
the env's own). Reported: the mean score and its distribution, each paying term's
mean (``reward/<name>``), the KL per response, the response length, the EOS rate,
and, where the task has exact answers, the accuracy (mean of the answer check) and
pass@k (the fraction of prompts with at least one right answer among k).

Training logs the same figures for its own rollouts (``env/...``) and, through
``evaluate_policy``, for the eval prompts (``eval/...``); the examples and the
stable-baselines3 scripts report the same figures through ``episode_metrics``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from torch import Tensor
from transformers.utils import logging as hf_logging

from agents.policy import ActorCritic
from agents.rollout import Rollout, collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.config import AsPath, check_int
from textenv.loading import looks_like_path, resolve_device
from textenv.tasks import get_task

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def episode_metrics(scores: Tensor, kl: Tensor, lengths: Tensor, terminated: Tensor, prefix: str) -> dict[str, float]:
    """Per-episode tensors (B,): score, KL to the reference (summed over the response), length, ended by EOS.

    Returns the mean score and its std, the fraction scored positive, the mean KL
    per response, the mean length and the EOS rate, under ``prefix/``.
    """
    return {
        f"{prefix}/score": float(scores.mean()),
        f"{prefix}/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/positive_rate": float((scores > 0).float().mean()),
        f"{prefix}/kl": float(kl.mean()),
        f"{prefix}/response_length": float(lengths.float().mean()),
        f"{prefix}/eos_rate": float(terminated.float().mean()),
    }


def rollout_metrics(rollout: Rollout, prefix: str) -> dict[str, float]:
    """``episode_metrics`` of a rollout's episodes, and each paying term's mean as ``prefix/reward/<name>``."""
    metrics = episode_metrics(rollout.scores, rollout.kl.sum(1), rollout.mask.sum(1), rollout.terminated, prefix)
    for name, values in rollout.reward_terms.items():
        metrics[f"{prefix}/reward/{name}"] = float(values.mean())
    if rollout.env_mask is not None:
        metrics[f"{prefix}/replies"] = float(replies(rollout).float().mean())
    return metrics


def replies(rollout: Rollout) -> Tensor:
    """(B,) how many times the environment answered in each episode (0 for episodes of one turn)."""
    if rollout.env_mask is None:
        return torch.zeros(len(rollout.actions), dtype=torch.long)
    env = rollout.env_mask
    return (env[:, 1:] & ~env[:, :-1]).sum(1) + env[:, 0].long()


def pass_at_k(correct: Tensor, k: int) -> float:
    """The fraction of prompts with at least one right answer among their ``k`` consecutive episodes.

    ``correct`` (B,) holds 1 for a right answer, 0 for a wrong one; B is a multiple of k.
    With exactly k samples a prompt this is the unbiased estimator of Chen et al. (2021).
    """
    if correct.ndim != 1 or len(correct) % k:
        raise ValueError(f"pass@k needs groups of k={k} episodes; got {tuple(correct.shape)}")
    return float((correct.reshape(-1, k) > 0.5).any(1).float().mean())


def concatenate(rollouts: list[Rollout]) -> dict[str, Tensor]:
    """The per-episode figures of several rollouts, end to end: score, kl, length, terminated, reward terms."""
    data = {
        "score": torch.cat([r.scores for r in rollouts]),
        "kl": torch.cat([r.kl.sum(1) for r in rollouts]),
        "length": torch.cat([r.mask.sum(1) for r in rollouts]),
        "terminated": torch.cat([r.terminated for r in rollouts]),
    }
    for name in rollouts[0].reward_terms:
        data["reward/" + name] = torch.cat([r.reward_terms[name] for r in rollouts])
    if any(r.env_mask is not None for r in rollouts):
        data["replies"] = torch.cat([replies(r) for r in rollouts])
    return data


def summarize(data: dict[str, Tensor], prefix: str, k: int = 1, accuracy: str | None = None) -> dict[str, float]:
    """The metrics of per-episode figures (``concatenate``): means, the score's quantiles, accuracy and pass@k."""
    metrics = episode_metrics(data["score"], data["kl"], data["length"], data["terminated"], prefix)
    for key, values in data.items():
        if key.startswith("reward/") or key == "replies":
            metrics[f"{prefix}/{key}"] = float(values.float().mean())
    for q, value in zip(QUANTILES, torch.quantile(data["score"].float(), torch.tensor(QUANTILES)).tolist()):
        metrics[f"{prefix}/score_q{int(q * 100):02d}"] = value
    if accuracy is not None:
        correct = data["reward/" + accuracy]
        metrics[f"{prefix}/accuracy"] = float(correct.mean())
        metrics[f"{prefix}/pass@{k}"] = pass_at_k(correct, k)
    metrics[f"{prefix}/episodes"] = float(len(data["score"]))
    return metrics


def evaluate_policy(
    agent: ActorCritic,
    env,
    prompt_indices: np.ndarray,
    k: int,
    temperature: float,
    generator: torch.Generator,
    autocast=None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Answer each prompt of ``prompt_indices`` ``k`` times on the lockstep ``env``; per-episode figures.

    Episodes run in batches of ``env.num_envs`` (a multiple of k); the last batch is
    filled with repeats that are dropped. The agent is in eval mode afterwards.
    """
    agent.eval()
    batch = env.num_envs
    if batch % k:
        raise ValueError(f"the eval env's {batch} slots must be a multiple of k={k}")
    wanted = np.repeat(np.asarray(prompt_indices, dtype=np.int64), k)
    rollouts, kept = [], []
    starts = range(0, len(wanted), batch)
    for start in starts if not progress else _bar(starts, len(wanted)):
        chunk = wanted[start : start + batch]
        kept.append(len(chunk))
        chunk = np.resize(chunk, batch)  # fill a short last batch with repeats
        options = {"prompt_index": chunk}
        rollouts.append(collect_rollout(agent, env, temperature, start, generator, autocast, reset_options=options))
    data = concatenate(rollouts)
    keep = torch.cat([torch.arange(n) + i * batch for i, n in enumerate(kept)])
    return {key: values[keep] for key, values in data.items()}


def _bar(starts: range, episodes: int):
    from tqdm.auto import tqdm

    return tqdm(starts, desc=f"evaluating {episodes} episodes", unit="batch")


def evaluate(agent: ActorCritic, env, temperature: float, episodes: int, generator, autocast=None, accuracy=None):
    """``eval/...`` metrics of ``episodes`` episodes (one batch of ``env``), the eval prompts taken in order."""
    indices = np.arange(episodes) % len(env.unwrapped.core.prompts)
    data = evaluate_policy(agent, env, indices, 1, temperature, generator, autocast)
    return summarize(data, "eval", 1, accuracy)


# ---------------------------------------------------------------- the command
@dataclass
class EvalConfig:
    """Evaluate a policy on a task's eval prompts: k samples a prompt, mean reward, KL, length, EOS, pass@k."""

    env: TokenEnvConfig = field(default_factory=lambda: TokenEnvConfig(split="eval"))
    """The task and its reward (TokenRLHF-v0's settings); the eval split by default."""
    policy: Annotated[str | None, AsPath] = None
    """The policy: a saved model directory (a training run's final/ works) or hub name. Default: the task's SFT
    model."""
    k: int = 4
    """Samples per prompt (pass@k uses all k)."""
    num_prompts: int | None = None
    """Evaluate the first N eval prompts (default: all)."""
    batch_size: int = 64
    """Episodes stepped together (rounded down to a multiple of k)."""
    seed: int = 0
    """Sampling seed."""
    json: Path | None = None
    """Write the figures to this JSON file."""
    device: str | None = None
    """'cpu', 'cuda', ... (default: CUDA when available)."""
    threads: int | None = None
    """torch's CPU threads (default: torch's choice)."""

    def __post_init__(self):
        for name in ("k", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        if self.num_prompts is not None:
            check_int("num_prompts", self.num_prompts, minimum=1)


def load_agent(policy: str | Path) -> ActorCritic:
    """A policy directory as an actor-critic (its critic unused): a plain causal LM, a training run's saved
    agent, or LoRA adapters."""
    path = Path(policy).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return ActorCritic.from_pretrained(path)
    return ActorCritic.from_models(str(path) if path.is_dir() else str(policy))


def run_evaluation(config: EvalConfig, progress: bool = True) -> dict[str, float]:
    """Evaluate ``config.policy`` on its task's eval prompts; returns (and writes, with ``--json``) the metrics."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    task = get_task(config.env.task)
    policy = config.policy or str(task.policy_dir)
    if looks_like_path(policy) and not Path(policy).expanduser().is_dir():
        raise FileNotFoundError(f"--policy {policy!r} is not a directory: pass the directory of a saved model")
    agent = load_agent(policy).to(device)
    env_config = replace(config.env, reference_model=config.env.reference_model or str(task.policy_dir))
    if env_config.tokenizer is None:
        env_config = replace(env_config, tokenizer=policy)
    batch = max(config.k, config.batch_size // config.k * config.k)
    env = make_rollout_env(batch, replace(env_config, device=device))
    core = env.unwrapped.core
    count = len(core.prompts) if config.num_prompts is None else min(config.num_prompts, len(core.prompts))
    accuracy = core.accuracy
    generator = torch.Generator(device=device).manual_seed(config.seed)
    data = evaluate_policy(agent, env, np.arange(count), config.k, env_config.temperature, generator, None, progress)
    metrics = summarize(data, "eval", config.k, accuracy)
    metrics["eval/prompts"] = float(count)
    if config.json is not None:
        record = {
            "task": config.env.task,
            "policy": policy,
            "k": config.k,
            "seed": config.seed,
            **{key.removeprefix("eval/"): value for key, value in metrics.items()},
        }
        if accuracy is not None:
            record["accuracy"], record["pass@k"] = metrics["eval/accuracy"], metrics[f"eval/pass@{config.k}"]
        path = Path(config.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return metrics


def table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column Markdown table."""
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        lines.append(f"| {key.removeprefix('eval/')} | {value:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    config = tyro.cli(EvalConfig, args=argv, config=(tyro.conf.OmitArgPrefixes,), description=__doc__)
    hf_logging.disable_progress_bar()
    try:
        metrics = run_evaluation(config)
    except (ValueError, TypeError, OSError, ImportError) as error:  # bad settings or files: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(table(metrics))
    if config.json is not None:
        print(f"\nwritten to {config.json}")


if __name__ == "__main__":
    main()
