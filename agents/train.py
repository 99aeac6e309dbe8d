"""Token-level PPO on TokenRLHF-v0: the training loop.

    python -m agents --iterations 60 --run-dir runs/ppo

Each iteration: set the env's KL coefficient, collect a lockstep batch of episodes
(``collect_rollout``), run the PPO update (``ppo_update``), adapt the KL
coefficient, log, checkpoint. Everything else lives beside it: checkpoints and
resume in ``checkpoint.py``, the metrics in ``evaluate.py``, processes in
``distributed.py``, files in ``logger.py``; ``Trainer`` below builds it all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import torch
import tyro
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from agents.checkpoint import Checkpoints, TrainerState
from agents.distributed import Distributed
from agents.evaluate import evaluate, rollout_metrics
from agents.kl_control import KLConfig
from agents.logger import RunLogger, read_jsonl
from agents.lora import AdaptersDisabled, add_lora
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import Rollout, collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.config import AsPath
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.loading import resolve_device


@dataclass
class RunConfig:
    """The run: what to train, size, seed, outputs, device."""

    policy: Annotated[str | None, AsPath] = None
    """Policy to train and reference model: a local directory or hub name (default: the embedded SFT model)."""
    eval_prompts: Annotated[str | None, AsPath] = None
    """Held-out prompts for evaluation, a text file (default: the embedded eval prompts)."""
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
    env: TokenEnvConfig = field(default_factory=lambda: TokenEnvConfig(score_clip=5.0))
    """The task (TokenRLHF-v0's settings); training clips scores at +-5 as DeepSpeed-Chat does."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        """Raise on a configuration that cannot run, before any work."""
        ppo, run = self.ppo, self.run
        self.env.validate()  # fields may have been set after construction
        if run.batch_size % ppo.minibatch_size:
            raise ValueError(
                f"batch_size ({run.batch_size}) must be a multiple of minibatch_size ({ppo.minibatch_size})"
            )
        if ppo.minibatch_size % ppo.micro_batch_size:
            raise ValueError(
                f"minibatch_size ({ppo.minibatch_size}) must be a multiple of micro_batch_size ({ppo.micro_batch_size})"
            )
        if ppo.algo not in ("ppo", "rloo", "grpo"):
            raise ValueError(f"algo must be 'ppo', 'rloo' or 'grpo', got {ppo.algo!r}")
        if ppo.algo != "ppo" and (ppo.group_size < 2 or run.batch_size % ppo.group_size):
            raise ValueError(
                f"{ppo.algo} needs group_size >= 2 dividing batch_size ({run.batch_size}); got {ppo.group_size}"
            )
        if run.fsdp and run.lora_rank:
            raise ValueError("--fsdp with --lora-rank is not supported: LoRA already keeps the trained state small")
        if run.iterations < 1 or run.checkpoint_every < 1 or run.eval_every < 1:
            raise ValueError("iterations, checkpoint_every and eval_every must be >= 1")
        for name, path in (("prompts", self.env.prompts), ("eval_prompts", run.eval_prompts)):
            if isinstance(path, str) and not Path(path).is_file():
                raise FileNotFoundError(f"--{name.replace('_', '-')} file {path!r} does not exist")


def train(config: TrainConfig) -> Path:
    """Run (or resume) PPO as configured; returns the directory of the final policy."""
    t = Trainer(config)
    ppo, run, temperature = config.ppo, config.run, config.env.temperature
    group_size = ppo.group_size if not ppo.uses_critic else None
    bar = tqdm(
        range(t.start, run.iterations),
        desc=ppo.algo.upper(),
        disable=not (run.progress and t.dist.is_main),
        initial=t.start,
        total=run.iterations,
    )
    last = t.start - 1
    for iteration in bar:
        if t.budget_spent():
            break  # a resumed run that had already spent its budget
        began = time.perf_counter()
        metrics = t.evaluate(iteration) if iteration % run.eval_every == 0 else {}  # iteration 0: the SFT policy
        t.env.kl_coef = t.kl.value
        t.agent.eval()
        rollout = collect_rollout(t.agent, t.env, temperature, t.seed + iteration, t.sampling, t.autocast, group_size)
        rollout_seconds = time.perf_counter() - began
        t.model.train()
        metrics |= ppo_update(t.model, t.optimizer, rollout, ppo, temperature, t.shuffling, t.autocast)
        metrics |= rollout_metrics(rollout, "env")
        metrics |= {"perf/tokens_per_s": float(rollout.mask.sum()) / rollout_seconds}
        metrics |= {"perf/iteration_s": time.perf_counter() - began}
        metrics = t.gather_metrics(iteration, metrics)
        t.scheduler.step()
        t.kl.update(metrics["env/kl"], len(rollout.actions) * t.dist.world_size)
        t.tokens += t.dist.sum(int(rollout.mask.sum()))
        metrics["perf/tokens_total"] = t.tokens
        done = iteration == run.iterations - 1 or t.budget_spent()
        t.log(iteration, metrics, rollout, bar)
        if (iteration + 1) % run.checkpoint_every == 0 or done:
            t.save_checkpoint(iteration)
        t.dist.barrier()
        last = iteration
        if done:
            break
    return t.finish(last + 1)


class Trainer:
    """Everything the loop of ``train`` uses, built (or resumed) from a ``TrainConfig``."""

    def __init__(self, config: TrainConfig):
        config.validate()
        self.config, run = config, config.run
        if run.threads is not None:
            torch.set_num_threads(run.threads)
        self.dist = dist = Distributed(resolve_device(run.device), fsdp=run.fsdp)
        self.device, self.run_dir = dist.device, Path(run.run_dir)
        self.checkpoints = Checkpoints(self.run_dir)
        if not run.resume and self.checkpoints.latest() is not None:
            raise FileExistsError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
            )
        resumed = self.checkpoints.resume() if run.resume else None
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")

        torch.manual_seed(run.seed)  # the same initial weights on every rank
        self.agent = build_agent(config, None if resumed is None else resumed.directory / "agent", self.device)
        self.model = dist.wrap(self.agent)
        self.env, self.eval_env = build_envs(config, self.agent, self.device)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" and run.bf16 else None
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=config.ppo.learning_rate, eps=1e-5)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: max(0.0, 1 - it / run.iterations))
        self.kl = config.kl.controller(config.env.kl_coef)
        self.seed = dist.seed(run.seed)
        self.sampling = torch.Generator(device=self.device).manual_seed(self.seed)
        self.shuffling = torch.Generator().manual_seed(self.seed + 1)
        self.start, self.tokens = 0, 0
        if resumed is not None:
            self.restore(resumed)
        self.logger = RunLogger(self.run_dir, self.start) if dist.is_main else None
        self.raw_metrics = self.run_dir / f"metrics-rank{dist.rank}.jsonl" if dist.enabled else None
        if self.raw_metrics is not None and self.raw_metrics.exists():  # a resumed run: keep what the checkpoint covers
            kept = [row for row in read_jsonl(self.raw_metrics) if row["iteration"] < self.start]
            self.raw_metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def restore(self, resumed) -> None:
        state = resumed.state
        if state.world_size != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.world_size} processes; resume it with as many "
                f"(got {self.dist.world_size})"
            )
        self.dist.load_optimizer_state(self.model, self.optimizer, resumed.optimizer)
        self.scheduler.load_state_dict(resumed.scheduler)
        for generator, saved in zip((self.sampling, self.shuffling), resumed.generators[self.dist.rank]):
            generator.set_state(saved)
        self.start, self.kl.value, self.tokens = state.iteration + 1, state.kl_coef, state.tokens

    def budget_spent(self) -> bool:
        budget = self.config.run.token_budget
        return budget is not None and self.tokens >= budget

    def evaluate(self, iteration: int) -> dict[str, float]:
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 10**6 + iteration)
        return evaluate(self.agent, self.eval_env, self.config.env.temperature, self.seed, generator, self.autocast)

    def gather_metrics(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """This rank's metrics (kept raw under torchrun), averaged over ranks, plus the loop's own state."""
        if self.raw_metrics is not None:
            with self.raw_metrics.open("a") as f:
                f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        metrics = self.dist.mean_metrics(metrics)
        metrics["env/non_score_reward"] = -self.kl.value * metrics["env/kl"]
        metrics["kl/coef"] = self.kl.value
        metrics["perf/lr"] = self.scheduler.get_last_lr()[0]
        if not self.dist.fsdp:  # FSDP ranks hold different shards by design
            metrics["dist/parameter_spread"] = self.dist.parameter_spread(self.agent)
        return metrics

    def log(self, iteration: int, metrics: dict[str, float], rollout: Rollout, bar) -> None:
        if not self.dist.is_main:
            return
        samples = [
            {"prompt": p, "response": r, "score": float(s)}
            for p, r, s in list(zip(rollout.prompts, rollout.responses, rollout.scores.tolist()))[:4]
        ]
        self.logger.log(iteration, metrics, samples)
        bar.set_postfix(
            score=f"{metrics['env/score']:+.2f}",
            pos=f"{metrics['env/positive_rate']:.0%}",
            kl=f"{metrics['env/kl']:.2f}",
        )
        if iteration % self.config.run.eval_every == 0:
            self.logger.plot()

    def save_checkpoint(self, iteration: int) -> None:
        """A collective under torchrun (generator states and FSDP shards are gathered); rank 0 writes."""
        generators = self.dist.gather([self.sampling.get_state(), self.shuffling.get_state()])
        agent = self.dist.full_agent(self.model, self.agent)
        optimizer = self.dist.optimizer_state(self.model, self.optimizer)
        if self.dist.is_main:
            state = TrainerState(iteration, self.kl.value, self.tokens, self.dist.world_size)
            self.checkpoints.save(iteration, agent, optimizer, self.scheduler.state_dict(), generators, state)

    def finish(self, iteration: int) -> Path:
        """Evaluate the trained policy on the eval prompts, save it with its tokenizer to run_dir/final."""
        metrics = self.dist.mean_metrics(self.evaluate(iteration))
        final = self.run_dir / "final"
        agent = self.dist.full_agent(self.model, self.agent)
        if self.dist.is_main:
            self.logger.log(iteration, metrics, [])
            self.logger.plot()
            agent.save_pretrained(final)
            self.env.unwrapped.tokenizer.save_pretrained(final)
            self.logger.close()
        self.dist.barrier()
        self.dist.shutdown()
        return final


def build_agent(config: TrainConfig, saved: Path | None, device: torch.device) -> ActorCritic:
    """The trainable actor-critic: from a checkpoint, or the policy (with LoRA adapters if asked) and a new critic.

    A separate critic trunk starts from the reward model when it has the policy's
    architecture (Stiennon et al. 2020), else from the policy.
    """
    run = config.run
    if saved is not None:
        agent = ActorCritic.from_pretrained(saved)
    else:
        policy = AutoModelForCausalLM.from_pretrained(run.policy or POLICY_DIR)
        if run.lora_rank:
            targets = run.lora_target_modules.split(",") if run.lora_target_modules else None
            policy = add_lora(policy, run.lora_rank, run.lora_alpha, targets)
        reward_source = config.env.reward_model or REWARD_MODEL_DIR
        same_trunk = AutoConfig.from_pretrained(reward_source).model_type == policy.config.model_type
        critic_init = reward_source if same_trunk and not run.share_backbone else None
        agent = ActorCritic.from_models(policy, share_backbone=run.share_backbone, critic_init=critic_init)
    agent.to(device).train()
    if run.gradient_checkpointing:
        agent.policy.gradient_checkpointing_enable()
    return agent


def build_envs(config: TrainConfig, agent: ActorCritic, device: torch.device):
    """The training and evaluation envs; they share one set of frozen models.

    The reference model is the starting policy (with LoRA: the policy's own base,
    adapters off, with no second copy of the weights).
    """
    policy_source = str(config.run.policy or POLICY_DIR)
    reference = AdaptersDisabled(agent.policy) if config.run.lora_rank else policy_source
    env_config = replace(config.env, reference_model=reference, tokenizer=policy_source, device=device)
    env = make_rollout_env(config.run.batch_size, env_config)
    frozen = env.unwrapped
    eval_config = replace(
        env_config,
        prompts=config.run.eval_prompts or load_prompts("eval"),
        reference_model=frozen.reference_model,
        reward_model=frozen.reward_model,
        tokenizer=frozen.tokenizer,
    )
    return env, make_rollout_env(config.run.eval_episodes, eval_config)


def cli(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The training command line: every field of ``TrainConfig``, without group prefixes."""
    return tyro.cli(TrainConfig, args=argv, config=(tyro.conf.OmitArgPrefixes,), description=description)
