"""Evaluate a policy on a task's held-out prompts: the one place evaluation metrics are computed.

    python -m agents.evaluate --task arithmetic                       # the task's SFT model
    python -m agents.evaluate --task arithmetic --policy runs/grpo/final --json eval.json

Every eval prompt is answered ``k`` times (sampled at the env's temperature, each
episode an ordinary env episode: the KL to the reference and every reward term are
the env's own). Reported: the mean score and its distribution, each paying term's
mean (``reward/<name>``), the KL per response, the response length, the EOS rate,
and, where the task has exact answers, the accuracy (mean of the answer check) and
pass@k (the fraction of prompts with at least one right answer among k). With an
interaction, ``reward/interaction`` is the mean of what its replies paid per episode
(a game's outcome) and ``interaction_gt0_rate`` the share of episodes paid above 0
(a game's win rate where a win pays +1).

Training logs the same figures for its own rollouts (``env/...``) and, through
``evaluate_policy``, for the eval prompts (``eval/...``); the examples and the
stable-baselines3 scripts report the same figures through ``episode_metrics``.
Both commands run the env on ``resolve_config`` of the same ``TokenEnvConfig``
defaults, so a policy's ``eval/score`` is the same figure in both (with
``--k 1`` and the trainer's sampling seed, the same episodes).

What this reads of the env is its public API: ``prompts`` and ``accuracy_term``
(``textenv.env.CoreView``) and the ``info`` of each step (``textenv.info``).

The fraction of episodes scored above 0 is ``positive_rate`` on the review task
with its own reward model (a score > 0 is a positive review), and
``score_gt0_rate`` elsewhere, where a score above 0 means no more than that
(``score_rate_key``).

The KL of ``python -m agents.evaluate`` is to the evaluated policy's own reference:
``--reference-model``, else for a training run's policy (its ``final/`` or its
directory) the policy that run started from (its ``config.json``), else for the
task's SFT model itself. Any other policy without ``--reference-model`` is
refused: the task's SFT model would be another policy's reference, and its KL
would not say how far the policy moved (``evaluation_reference``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from torch import Tensor
from transformers.utils import logging as hf_logging

from agents.policy import ActorCritic, agent_autocast
from agents.rollout import INTERACTION_TERM, Rollout, collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.config import AsPath, check_int, resolve_config
from textenv.loading import eval_split, looks_like_path, resolve_device
from textenv.reward_fns import import_from_working_directory
from textenv.tasks import get_task

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


POSITIVE_RATE, SCORE_RATE = "positive_rate", "score_gt0_rate"


def score_rate_key(env: TokenEnvConfig) -> str:
    """The name of the fraction of episodes scored above 0, for an env config as given (unresolved):
    ``positive_rate`` where the review task's own reward model pays (a score > 0 is a positive review), else the
    neutral ``score_gt0_rate``."""
    reviews = env.task == "reviews" and env.reward_model is None and not env.reward_fns
    return POSITIVE_RATE if reviews else SCORE_RATE


def episode_metrics(
    scores: Tensor, kl: Tensor, lengths: Tensor, terminated: Tensor, prefix: str, rate_key: str = POSITIVE_RATE
) -> dict[str, float]:
    """Per-episode tensors (B,): score, KL to the reference (summed over the response), length, ended by EOS.

    Returns the mean score and its std, the fraction scored above 0 (as ``rate_key``:
    ``score_rate_key``), the mean KL per response, the mean length and the EOS rate,
    under ``prefix/``.
    """
    return {
        f"{prefix}/score": float(scores.mean()),
        f"{prefix}/score_std": float(scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/{rate_key}": float((scores > 0).float().mean()),
        f"{prefix}/kl": float(kl.mean()),
        f"{prefix}/response_length": float(lengths.float().mean()),
        f"{prefix}/eos_rate": float(terminated.float().mean()),
    }


def rollout_metrics(rollout: Rollout, prefix: str, rate_key: str = POSITIVE_RATE) -> dict[str, float]:
    """``episode_metrics`` of a rollout's episodes, and each paying term's mean as ``prefix/reward/<name>``."""
    lengths = rollout.mask.sum(1)
    metrics = episode_metrics(rollout.scores, rollout.kl.sum(1), lengths, rollout.terminated, prefix, rate_key)
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


def summarize(
    data: dict[str, Tensor], prefix: str, k: int = 1, accuracy: str | None = None, rate_key: str = POSITIVE_RATE
) -> dict[str, float]:
    """The metrics of per-episode figures (``concatenate``): means, the score's quantiles, accuracy and pass@k."""
    metrics = episode_metrics(data["score"], data["kl"], data["length"], data["terminated"], prefix, rate_key)
    for key, values in data.items():
        if key.startswith("reward/") or key == "replies":
            metrics[f"{prefix}/{key}"] = float(values.float().mean())
    if "reward/" + INTERACTION_TERM in data:  # a game's win rate, where it pays +1 a win
        paid = data["reward/" + INTERACTION_TERM]
        metrics[f"{prefix}/{INTERACTION_TERM}_gt0_rate"] = float((paid > 0).float().mean())
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
        rollouts.append(
            collect_rollout(
                agent, env, temperature, start, generator, autocast, reset_options=options, value_prior=False
            )
        )
    data = concatenate(rollouts)
    keep = torch.cat([torch.arange(n) + i * batch for i, n in enumerate(kept)])
    return {key: values[keep] for key, values in data.items()}


def _bar(starts: range, episodes: int):
    from tqdm.auto import tqdm

    return tqdm(starts, desc=f"evaluating {episodes} episodes", unit="batch")


def evaluate(
    agent: ActorCritic, env, temperature: float, episodes: int, generator, autocast=None, rate_key=POSITIVE_RATE
):
    """``eval/...`` metrics of ``episodes`` episodes (one batch of ``env``), the eval prompts taken in order; with
    accuracy and pass@1 where the env has an ``accuracy_term``."""
    indices = np.arange(episodes) % len(env.unwrapped.prompts)
    data = evaluate_policy(agent, env, indices, 1, temperature, generator, autocast)
    return summarize(data, "eval", 1, env.unwrapped.accuracy_term, rate_key)


# ---------------------------------------------------------------- the command
@dataclass
class EvalConfig:
    """Evaluate a policy on a task's eval prompts: k samples a prompt, mean reward, KL, length, EOS, pass@k."""

    env: TokenEnvConfig = field(default_factory=lambda: TokenEnvConfig(split="eval"))
    """The task and its reward (TokenRLHF-v0's settings, the trainer's defaults; the fields left unset take the
    task's values); the eval split by default. --accuracy-term NAME names the reward function whose value (1 right,
    0 wrong) gives accuracy and pass@k."""
    policy: Annotated[str | None, AsPath] = None
    """The policy: a saved model directory (a training run's final/ or the run's directory works) or hub name.
    Default: the task's SFT model."""
    reference_model: Annotated[str | None, AsPath] = None
    """The KL's reference model, a directory or hub name. Default: the policy's own starting point: for a training
    run's policy, the policy its config.json started from; for the task's SFT model, itself. Any other policy needs
    this flag (pass the policy itself to measure no drift)."""
    tokenizer: Annotated[str | None, AsPath] = None
    """The policy's tokenizer, a directory or hub name, when it is not saved with the policy."""
    k: int = 4
    """Samples per prompt (pass@k uses all k)."""
    num_prompts: int | None = None
    """Evaluate the first N eval prompts (default: all)."""
    batch_size: int = 64
    """Episodes stepped together (rounded down to a multiple of k)."""
    seed: int = 0
    """Sampling seed. The trainer's evaluation before iteration i of a run with --seed s samples with s + 1000000 + i
    (agents.train.eval_seed): with --k 1 and its episodes as prompts, this command reports its figures."""
    json: Path | None = None
    """Write the figures to this JSON file (checked before the evaluation starts)."""
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


def check_output_path(path: Path, flag: str = "--json") -> None:
    """Refuse, before any work, an output file that could not be written: a folder, or a path under a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; name a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{flag} {path}: the folder {folder} is not writable; choose another path")


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def training_run(policy: Path) -> tuple[Path, Path] | None:
    """``(run directory, policy directory)`` when ``policy`` is a training run's directory (its final/ is the
    policy) or lies in one (final/, a checkpoint's agent/); else None."""
    from agents.train import CONFIG_FILE, is_textenv_run

    for candidate in (policy, *list(policy.parents)[:2]):
        if (candidate / CONFIG_FILE).is_file() and is_textenv_run(candidate):
            if candidate == policy:
                final = policy / "final"
                if not final.is_dir():
                    raise FileNotFoundError(
                        f"--policy {policy} is a training run without final/ (it has not finished); pass one of its "
                        "checkpoints' agent/ folders, or finish it with --resume"
                    )
                return candidate, final
            return candidate, policy
    return None


def evaluation_reference(config: EvalConfig, env: TokenEnvConfig) -> tuple[str, str, str]:
    """``(policy, reference model, why that reference)`` of an evaluation; ``env`` is resolved.

    The reference is the policy's own starting point (see the module's docstring); a policy
    whose starting point is unknown needs ``--reference-model``.
    """
    task_policy = str(env.reference_model)
    if config.policy is None:
        return task_policy, config.reference_model or task_policy, "the task's SFT model, the policy itself"
    policy = config.policy
    if looks_like_path(policy) and not Path(policy).expanduser().is_dir():
        raise FileNotFoundError(f"--policy {policy!r} is not a directory: pass the directory of a saved model")
    path = Path(policy).expanduser()
    run = training_run(path.resolve()) if path.is_dir() else None
    if run is not None:
        policy = str(run[1])
    if config.reference_model is not None:
        return policy, config.reference_model, "--reference-model"
    if path.is_dir() and Path(task_policy).is_dir() and path.resolve() == Path(task_policy).resolve():
        return policy, task_policy, "the task's SFT model, the policy itself"
    if run is None:
        raise ValueError(
            f"--policy {config.policy}: the KL to the reference needs the policy's own starting point, and this "
            "policy is neither the task's SFT model nor a training run's (no run config.json beside it). Pass "
            "--reference-model with the model it was trained from (or the policy itself to measure no drift; the "
            f"task's SFT model is {task_policy})"
        )
    from agents.train import config_from_json, policy_source, read_run_config

    trained = config_from_json(read_run_config(run[0])[0])
    if trained.env.task != env.task:
        print(f"note: {run[0]} trained on task {trained.env.task!r}; evaluating on {env.task!r}", file=sys.stderr)
    reference = policy_source(trained.run, resolve_config(trained.env))  # as the run's build_envs took it
    if looks_like_path(reference) and not Path(reference).expanduser().is_dir():
        raise FileNotFoundError(
            f"the run {run[0]} started from {reference} (its config.json), its KL reference, which is not found "
            "from here; pass --reference-model"
        )
    return policy, reference, f"the policy {run[0]} started from (its config.json)"


def accuracy_notes(config: EvalConfig, data: dict[str, Tensor], accuracy: str | None) -> list[str]:
    """Why accuracy and pass@k are missing, where they are: the figures not computed and what would give them."""
    if accuracy is not None:
        return []
    names = [key.removeprefix("reward/") for key in data if key.startswith("reward/") and key != "reward/reward_model"]
    own = get_task(config.env.task).accuracy
    if own is not None and config.env.reward_fns:
        why = f"with --reward-fn, the task's answer check {own!r} does not pay, and no --accuracy-term names"
    else:
        why = "the task has no answer check (its score is not right or wrong), and no --accuracy-term names"
    which = f"one of the reward functions {names}" if names else "a reward function"
    return [
        f"note: accuracy and pass@{config.k} are not computed: {why} {which} that pays 1 for a right answer and 0 "
        "for a wrong one (--accuracy-term NAME)"
    ]


def run_evaluation(config: EvalConfig, progress: bool = True) -> dict[str, float]:
    """Evaluate ``config.policy`` on its task's eval prompts; returns (and writes, with ``--json``) the metrics.

    The notes (the reference the KL is to, figures that cannot be computed) go to stderr and the JSON.
    """
    if config.json is not None:
        check_output_path(config.json)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    autocast = agent_autocast(config.env.precision, device)  # the trainer's; bf16 where the device lacks it: refused
    env_config = resolve_config(config.env)  # the task's SFT policy is its reference model
    env_config = replace(env_config, split=eval_split(env_config.prompts, env_config.split))
    policy, reference, why = evaluation_reference(config, env_config)
    agent = load_agent(policy).to(device)
    tokenizer = config.tokenizer or env_config.tokenizer or policy
    folder = Path(tokenizer).expanduser() if isinstance(tokenizer, str | Path) else None
    if tokenizer == policy and folder is not None and folder.is_dir() and not has_tokenizer(folder):
        raise FileNotFoundError(
            f"--policy {policy} holds no tokenizer (no tokenizer.json or tokenizer_config.json): pass --tokenizer "
            "with the tokenizer the policy was trained with"
        )
    env_config = replace(env_config, reference_model=reference, tokenizer=tokenizer, device=device)
    batch = max(config.k, config.batch_size // config.k * config.k)
    env = make_rollout_env(batch, env_config)
    prompts, accuracy = env.unwrapped.prompts, env.unwrapped.accuracy_term
    count = len(prompts) if config.num_prompts is None else min(config.num_prompts, len(prompts))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    temperature = env_config.temperature
    data = evaluate_policy(agent, env, np.arange(count), config.k, temperature, generator, autocast, progress)
    metrics = summarize(data, "eval", config.k, accuracy, score_rate_key(config.env))
    metrics["eval/prompts"] = float(count)
    notes = [f"note: the KL is to the reference model {reference} ({why})", *accuracy_notes(config, data, accuracy)]
    for note in notes:
        print(note, file=sys.stderr)
    if config.json is not None:
        record = {
            "task": config.env.task,
            "policy": policy,
            "reference_model": reference,
            "k": config.k,
            "seed": config.seed,
            **{key.removeprefix("eval/"): value for key, value in metrics.items()},
            "notes": notes,
        }
        if accuracy is not None:
            record["accuracy"], record["pass@k"] = metrics["eval/accuracy"], metrics[f"eval/pass@{config.k}"]
        path = Path(config.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
    return metrics


LABELS = {SCORE_RATE: "score>0 rate"}  # the table's name of a metric, where it is not the metric's key


def table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column Markdown table."""
    lines = ["| metric | value |", "| --- | --- |"]
    for key, value in metrics.items():
        name = key.removeprefix("eval/")
        lines.append(f"| {LABELS.get(name, name)} | {value:.4g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import_from_working_directory()  # --reward-fn mod:f finds mod.py in the working folder, as python -m does
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
