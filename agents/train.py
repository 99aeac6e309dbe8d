"""Token-level PPO on TokenRLHF-v0: the training loop, checkpoints and resume.

    python -m agents --iterations 60 --run-dir runs/ppo

Each iteration: collect a lockstep batch of episodes (``collect_rollout``), run
the PPO update (``ppo_update``), adapt the KL coefficient, log, checkpoint. A
checkpoint is written every ``checkpoint_every`` iterations into a fresh
directory, and only then does the ``latest`` pointer move to it (an atomic
rename), so a run killed at any moment resumes from a complete checkpoint with
``--resume``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.distributed import (
    Distributed,
    Sharded,
    barrier,
    gather_objects,
    init_distributed,
    mean_metrics,
    parameter_spread,
    shutdown,
    sum_across_ranks,
)
from agents.kl_control import AdaptiveKLController, FixedKLController
from agents.logger import RunLogger, read_jsonl
from agents.lora import AdaptersDisabled, add_lora
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import Rollout, collect_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.env import read_prompts
from textenv.loading import load_causal_lm, load_reward_model, load_tokenizer, resolve_device


@dataclass
class EnvConfig:
    """The task: models, prompts and the reward."""

    policy: str | None = None
    """Policy to train and reference model: a local directory or hub name (default: the embedded SFT model)."""
    reward_model: str | None = None
    """Reward model: a local directory or hub name (default: the embedded review-sentiment model)."""
    prompts: str | None = None
    """Training prompts, a text file with one per line (default: the embedded train prompts)."""
    eval_prompts: str | None = None
    """Held-out prompts for evaluation, a text file (default: the embedded eval prompts)."""
    max_prompt_tokens: int = 16
    """Longest prompt in tokens (longer ones raise)."""
    max_new_tokens: int = 32
    """Longest response; an episode that reaches it is truncated."""
    temperature: float = 1.0
    """Sampling temperature; every log-prob uses logits / temperature."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta in r_t = -beta * (log pi - log pi_ref) + score."""
    adaptive_kl: bool = True
    """Adapt beta towards kl_target (Ziegler et al. 2019); else beta stays fixed."""
    kl_target: float = 3.0
    """Target KL per response, in nats, of the adaptive controller."""
    kl_horizon: int = 1000
    """Horizon of the adaptive controller, in episodes."""
    reward_mode: str = "sparse"
    """'sparse' (score on the last token) or 'dense' (score differences of prefixes)."""
    score_clip: float | None = 5.0
    """Clip reward-model scores to +-score_clip (None: no clip)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses cut off without EOS (None: no penalty)."""


@dataclass
class RunConfig:
    """The run: size, seed, outputs, device."""

    iterations: int = 60
    """PPO iterations (one rollout and one update each)."""
    token_budget: int | None = None
    """Stop early once this many response tokens have been generated in training rollouts."""
    batch_size: int = 64
    """Episodes per rollout in each process (the vector env's num_envs)."""
    share_backbone: bool = True
    """Critic = value head on the policy's trunk; False: a separate critic trunk (from the reward model)."""
    seed: int = 0
    """Seed of sampling, prompt draws and minibatch order."""
    run_dir: Path = Path("runs/ppo")
    """Where metrics, samples, the learning curve, checkpoints and the final policy go."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint."""
    checkpoint_every: int = 1
    """Iterations between checkpoints."""
    eval_every: int = 10
    """Iterations between evaluations on the eval prompts (and after the last)."""
    eval_episodes: int = 128
    """Episodes per evaluation in each process."""
    device: str | None = None
    """'cpu', 'cuda', ... (default: CUDA when available)."""
    bf16: bool = True
    """On CUDA, run forwards under bf16 autocast."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (large models)."""
    lora_rank: int = 0
    """LoRA rank: train PEFT adapters of this rank instead of all weights (0: full fine-tuning)."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    lora_target_modules: str | None = None
    """Comma-separated module names to adapt (default: PEFT's choice for the architecture)."""
    fsdp: bool = False
    """Under torchrun, shard the trainable model with FSDP instead of replicating it with DDP."""
    progress: bool = True
    """Show a progress bar."""
    threads: int | None = None
    """torch's CPU threads per process (default: torch's choice; 1 is often faster for tiny models on busy CPUs)."""


@dataclass
class TrainConfig:
    env: EnvConfig = field(default_factory=EnvConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate(config: TrainConfig) -> None:
    ppo, run = config.ppo, config.run
    if run.batch_size % ppo.minibatch_size:
        raise ValueError(f"batch_size ({run.batch_size}) must be a multiple of minibatch_size ({ppo.minibatch_size})")
    if ppo.minibatch_size % ppo.micro_batch_size:
        raise ValueError(
            f"minibatch_size ({ppo.minibatch_size}) must be a multiple of micro_batch_size ({ppo.micro_batch_size})"
        )
    if ppo.algo not in ("ppo", "rloo", "grpo"):
        raise ValueError(f"algo must be 'ppo', 'rloo' or 'grpo', got {ppo.algo!r}")
    if ppo.algo != "ppo" and (ppo.group_size < 2 or run.batch_size % ppo.group_size):
        raise ValueError(
            f"{ppo.algo} needs group_size >= 2 dividing batch_size ({run.batch_size}); got group_size {ppo.group_size}"
        )
    if run.fsdp and run.lora_rank:
        raise ValueError("--fsdp with --lora-rank is not supported: LoRA already keeps the trained state small")
    if run.iterations < 1 or run.checkpoint_every < 1 or run.eval_every < 1:
        raise ValueError("iterations, checkpoint_every and eval_every must be >= 1")
    for name, path in (("prompts", config.env.prompts), ("eval_prompts", config.env.eval_prompts)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} file {path!r} does not exist")


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(
    run_dir: Path, iteration: int, agent, optimizer_state: dict, scheduler, kl, generators, tokens: int
) -> None:
    """Write checkpoint-<iteration>, then point ``latest`` at it atomically, then drop older ones.

    ``generators``: the generator states of every rank, in rank order.
    """
    target = run_dir / f"checkpoint-{iteration:06d}"
    partial = run_dir / f".partial-checkpoint-{iteration:06d}"
    shutil.rmtree(partial, ignore_errors=True)
    agent.save_pretrained(partial / "agent")
    torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "generators": generators},
        partial / "trainer.pt",
    )
    state = {"iteration": iteration, "kl_coef": kl.value, "tokens": tokens, "world_size": len(generators)}
    (partial / "state.json").write_text(json.dumps(state))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(partial, target)
    pointer = run_dir / "latest.tmp"
    pointer.write_text(target.name)
    os.replace(pointer, run_dir / "latest")
    for old in run_dir.glob("checkpoint-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    return run_dir / pointer.read_text().strip() if pointer.exists() else None


# ---------------------------------------------------------------- metrics
def rollout_metrics(rollout: Rollout, prefix: str) -> dict[str, float]:
    lengths = rollout.mask.sum(1).float()
    return {
        f"{prefix}/score": float(rollout.scores.mean()),
        f"{prefix}/score_std": float(rollout.scores.std()),
        f"{prefix}/positive_rate": float((rollout.scores > 0).float().mean()),
        f"{prefix}/kl": float(rollout.kl.sum(1).mean()),
        f"{prefix}/response_length": float(lengths.mean()),
        f"{prefix}/eos_rate": float(rollout.terminated.float().mean()),
    }


def make_env(config: TrainConfig, prompts: list[str], num_envs: int, tokenizer, reference, reward_model, device):
    env_config = config.env
    return gym.make_vec(
        "TokenRLHF-v0",
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode=AutoresetMode.DISABLED,
        reference_model=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
        prompts=prompts,
        max_prompt_tokens=env_config.max_prompt_tokens,
        max_new_tokens=env_config.max_new_tokens,
        kl_coef=env_config.kl_coef,
        reward_mode=env_config.reward_mode,
        score_clip=env_config.score_clip,
        missing_eos_penalty=env_config.missing_eos_penalty,
        temperature=env_config.temperature,
        device=device,
    )


# ---------------------------------------------------------------- the loop
def build_agent(config: TrainConfig, checkpoint: Path | None, reward_model, device) -> tuple[ActorCritic, object]:
    """The trainable agent and the frozen reference model (with LoRA, the agent's own base, adapters off)."""
    env_config, run = config.env, config.run
    policy_source = env_config.policy or POLICY_DIR
    if checkpoint is not None:
        agent = ActorCritic.from_pretrained(checkpoint / "agent")
    else:
        policy = AutoModelForCausalLM.from_pretrained(policy_source)
        if run.lora_rank:
            targets = run.lora_target_modules.split(",") if run.lora_target_modules else None
            policy = add_lora(policy, run.lora_rank, run.lora_alpha, targets)
        same_trunk = reward_model.config.model_type == policy.config.model_type
        agent = ActorCritic.from_models(
            policy, share_backbone=run.share_backbone, critic_init=reward_model if same_trunk else None
        )
    agent.to(device).train()
    if run.gradient_checkpointing:
        agent.policy.gradient_checkpointing_enable()
    reference = AdaptersDisabled(agent.policy) if run.lora_rank else load_causal_lm(policy_source, device)
    return agent, reference


def wrap_for_training(agent: ActorCritic, info: Distributed, fsdp: bool, device) -> torch.nn.Module:
    """What the update calls: the agent itself, or its DDP replica / FSDP shards under torchrun.

    FSDP (PyTorch's ``fully_shard``) shards each transformer block and the rest of
    the agent; the rollout runs through the sharded agent, gathering one block's
    weights at a time.
    """
    if not info.enabled:
        return agent
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in agent.modules():
            if isinstance(block, torch.nn.ModuleList):  # the transformer blocks
                for layer in block:
                    fully_shard(layer)
        return fully_shard(agent)
    return DistributedDataParallel(agent, device_ids=[device.index] if device.type == "cuda" else None)


def train(config: TrainConfig) -> Path:
    """Run (or resume) PPO as configured; returns the directory of the final policy."""
    validate(config)
    env_config, run = config.env, config.run
    if run.threads is not None:
        torch.set_num_threads(run.threads)
    info, device = init_distributed(resolve_device(run.device))
    run_dir = Path(run.run_dir)
    checkpoint = latest_checkpoint(run_dir) if run.resume else None
    if run.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (no 'latest' file); start without --resume")
    if not run.resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    policy_source = env_config.policy or POLICY_DIR
    reward_source = env_config.reward_model or REWARD_MODEL_DIR
    tokenizer = load_tokenizer(policy_source)
    reward_model = load_reward_model(reward_source, device)
    agent, reference = build_agent(config, checkpoint, reward_model, device)
    sharded = Sharded(copy.deepcopy(agent).cpu()) if run.fsdp and info.enabled else None
    model = wrap_for_training(agent, info, run.fsdp, device)
    train_prompts = read_prompts(env_config.prompts) if env_config.prompts else load_prompts("train")
    eval_prompts = read_prompts(env_config.eval_prompts) if env_config.eval_prompts else load_prompts("eval")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and run.bf16 else None

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.ppo.learning_rate, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1.0 - it / run.iterations))
    if env_config.adaptive_kl:
        kl = AdaptiveKLController(env_config.kl_coef, env_config.kl_target, env_config.kl_horizon)
    else:
        kl = FixedKLController(env_config.kl_coef)
    seed = info.seed(run.seed)
    sampling = torch.Generator(device=device).manual_seed(seed)
    shuffling = torch.Generator().manual_seed(seed + 1)
    start, tokens_total = 0, 0
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        if state.get("world_size", 1) != info.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size', 1)} processes; resume it with as many "
                f"(got {info.world_size})"
            )
        trainer = torch.load(checkpoint / "trainer.pt", weights_only=False)
        if sharded is not None:
            sharded.load_optimizer_state(model, optimizer, trainer["optimizer"])
        else:
            optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        for generator, saved in zip((sampling, shuffling), trainer["generators"][info.rank]):
            generator.set_state(saved)
        start, kl.value, tokens_total = state["iteration"] + 1, state["kl_coef"], state["tokens"]

    env = make_env(config, train_prompts, run.batch_size, tokenizer, reference, reward_model, device)
    eval_env = make_env(config, eval_prompts, run.eval_episodes, tokenizer, reference, reward_model, device)
    logger = RunLogger(run_dir, start) if info.is_main else None
    raw_metrics = run_dir / f"metrics-rank{info.rank}.jsonl" if info.enabled else None
    if raw_metrics is not None and raw_metrics.exists():  # a resumed run: keep what the checkpoint covers
        kept = [row for row in read_jsonl(raw_metrics) if row["iteration"] < start]
        raw_metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def evaluate(iteration: int) -> dict[str, float]:
        agent.eval()
        generator = torch.Generator(device=device).manual_seed(seed + 10**6 + iteration)
        evaluation = collect_rollout(agent, eval_env, env_config.temperature, seed, generator, autocast)
        return rollout_metrics(evaluation, "eval")

    bar = tqdm(
        range(start, run.iterations),
        desc="PPO",
        disable=not (run.progress and info.is_main),
        initial=start,
        total=run.iterations,
    )
    last_iteration = start - 1
    for iteration in bar:
        if run.token_budget is not None and tokens_total >= run.token_budget:
            break  # a resumed run that had already spent its budget
        began = time.perf_counter()
        # evaluated before the update: iteration 0 measures the starting (SFT) policy
        metrics = evaluate(iteration) if iteration % run.eval_every == 0 else {}
        env.kl_coef = kl.value
        agent.eval()
        rollout_began = time.perf_counter()
        group = config.ppo.group_size if config.ppo.algo != "ppo" else None
        rollout = collect_rollout(agent, env, env_config.temperature, seed + iteration, sampling, autocast, group)
        rollout_seconds = time.perf_counter() - rollout_began
        model.train()
        metrics.update(ppo_update(model, optimizer, rollout, config.ppo, env_config.temperature, shuffling, autocast))
        metrics.update(rollout_metrics(rollout, "env"))
        metrics["perf/tokens_per_s"] = float(rollout.mask.sum()) / rollout_seconds
        metrics["perf/iteration_s"] = time.perf_counter() - began
        if raw_metrics is not None:
            with raw_metrics.open("a") as f:
                f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        metrics = mean_metrics(metrics, info, device)
        metrics["env/non_score_reward"] = -kl.value * metrics["env/kl"]
        metrics["kl/coef"] = kl.value
        metrics["perf/lr"] = scheduler.get_last_lr()[0]
        if sharded is None:  # FSDP ranks hold different shards by design
            metrics["dist/parameter_spread"] = parameter_spread(agent, info, device)
        scheduler.step()
        kl.update(metrics["env/kl"], len(rollout.actions) * info.world_size)
        tokens_total += sum_across_ranks(int(rollout.mask.sum()), info, device)
        metrics["perf/tokens_total"] = tokens_total
        done = iteration == run.iterations - 1 or (run.token_budget is not None and tokens_total >= run.token_budget)
        generators = gather_objects([sampling.get_state(), shuffling.get_state()], info)
        checkpointing = (iteration + 1) % run.checkpoint_every == 0 or done
        if checkpointing and sharded is not None:  # collectives: every rank takes part
            to_save, optimizer_state = sharded.gathered_agent(model, info), sharded.optimizer_state(model, optimizer)
        elif checkpointing:
            to_save, optimizer_state = agent, optimizer.state_dict()
        if info.is_main:
            samples = [
                {"prompt": p, "response": r, "score": float(s)}
                for p, r, s in list(zip(rollout.prompts, rollout.responses, rollout.scores.tolist()))[:4]
            ]
            logger.log(iteration, metrics, samples)
            bar.set_postfix(
                score=f"{metrics['env/score']:+.2f}",
                pos=f"{metrics['env/positive_rate']:.0%}",
                kl=f"{metrics['env/kl']:.2f}",
            )
            if checkpointing:
                save_checkpoint(run_dir, iteration, to_save, optimizer_state, scheduler, kl, generators, tokens_total)
            if iteration % run.eval_every == 0:
                logger.plot()
        barrier(info)
        last_iteration = iteration
        if done:
            break

    final_metrics = mean_metrics(evaluate(last_iteration + 1), info, device)  # the trained policy, eval prompts
    final = run_dir / "final"
    to_save = sharded.gathered_agent(model, info) if sharded is not None else agent
    if info.is_main:
        logger.log(last_iteration + 1, final_metrics, [])
        logger.plot()
        to_save.save_pretrained(final)
        tokenizer.save_pretrained(final)
        logger.close()
    barrier(info)
    shutdown(info)
    return final


def summary(run_dir: Path) -> str:
    """First and last evaluation of a run, as text."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    evals = [r for r in rows if "eval/score" in r]
    if not evals:
        return "no evaluation yet"
    first, last = evals[0], evals[-1]
    lines = [f"{'':22}{'iteration ' + str(first['iteration']):>16}{'iteration ' + str(last['iteration']):>16}"]
    for key in ("eval/positive_rate", "eval/score", "eval/kl", "eval/response_length", "eval/eos_rate"):
        lines.append(f"{key:22}{first[key]:>16.3f}{last[key]:>16.3f}")
    seconds = float(np.sum([r.get("perf/iteration_s", 0.0) for r in rows]))
    lines.append(f"{'time (s)':22}{'':>16}{seconds:>16.1f}")
    return "\n".join(lines)
