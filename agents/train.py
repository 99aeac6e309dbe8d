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
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from torch import Tensor
from tqdm.auto import tqdm

from agents.checkpoint import Checkpoints, TrainerState
from agents.distributed import Distributed
from agents.evaluate import evaluate, rollout_metrics, score_rate_key
from agents.kl_control import KLConfig
from agents.logger import RunLogger, read_jsonl, write_atomically
from agents.lora import AdaptersDisabled, add_lora
from agents.policy import ActorCritic, agent_autocast, load_policy
from agents.ppo import PPOConfig, ppo_update
from agents.rollout import Rollout, collect_rollout, make_rollout_env
from textenv import TokenEnvConfig
from textenv.config import AsPath, check_choice, check_float, check_int, resolve_config, resolve_precision
from textenv.loading import (
    eval_split,
    load_config,
    looks_like_path,
    read_prompts,
    resolve_device,
    reward_model_tokenizer,
)
from textenv.reward_fns import (
    RefusedCodeError,
    RewardFunctionError,
    check_code_name,
    describe,
    resolve_reward_fns,
    unstable_description,
)

CriticInit = Literal["reward", "policy"]
ValuePrior = Literal["score", "none"]


@dataclass
class RunConfig:
    """The run: what to train, size, seed, outputs, device."""

    policy: Annotated[str | None, AsPath] = None
    """Policy to train and reference model: a local directory or hub name (default: the embedded SFT model)."""
    tokenizer: Annotated[str | None, AsPath] = None
    """The policy's tokenizer, a directory or hub name, when it is not saved with the policy."""
    eval_prompts: Annotated[str | None, AsPath] = None
    """Held-out prompts for evaluation: a text file, a JSON-lines file (field --prompt-column) or a saved
    datasets directory (default: the eval_split of the training prompts' source: the task's, or a dataset dict's)."""
    eval_split: str = "eval"
    """The split evaluated when --eval-prompts is not given ('eval' also finds a dataset's 'test' or 'validation')."""
    iterations: int = 60
    """PPO iterations (one rollout and one update each). The learning rate decays linearly to 0 at this one: at
    iteration i it is learning_rate * (1 - i / iterations). --resume may change it; the resumed iterations then
    follow the schedule of the new value (the rate may jump at the first one), as if the run had been started
    with it."""
    token_budget: int | None = None
    """Stop early once this many response tokens have been generated in training rollouts."""
    batch_size: int = 64
    """Episodes per rollout in each process (the vector env's num_envs)."""
    share_backbone: bool = True
    """Critic = value head on the policy's trunk; False: a separate critic trunk (critic_init says which weights
    it starts from)."""
    critic_init: CriticInit | None = None
    """With --no-share-backbone: the weights the critic's trunk starts from, 'reward' (the reward model's; it needs
    the policy's architecture) or 'policy' (the starting policy's). None: the reward model's where it has the
    policy's architecture, else the policy's."""
    value_layer: int | None = None
    """With share_backbone: the block of the policy's trunk whose output the value head reads (1 .. its layers;
    the last is its final hidden state, which next-token prediction owns). None: the middle block,
    ceil(layers / 2) (docs/design.md)."""
    value_prior: ValuePrior | None = None
    """What the critic's values add to the value head's output: 'score', the reward model's score of the state's
    prefix times a trained weight that starts at 1, V(s) = head(h(s)) + w * score(s), so that the critic starts
    from the reward model's judgement and learns the rest; 'none', nothing. It needs a reward model that reads the
    policy's token ids and pays at the episode's end (reward_mode 'sparse'). None: 'score' for a critic on the
    policy's trunk (share_backbone) where the task has such a reward model, else 'none' (docs/design.md)."""
    seed: int = 0
    """Seed of sampling, prompt draws and minibatch order."""
    run_dir: Path = Path("runs/ppo")
    """Where metrics, samples, the learning curve, checkpoints and the final policy go."""
    resume: bool = False
    """Continue the run in run_dir from its latest checkpoint, with the settings of its config.json; a flag that
    changes one is refused, except those that only lengthen, pace or show the run (see iterations for the learning
    rate)."""
    checkpoint_every: int = 1
    """Iterations between checkpoints."""
    eval_every: int = 10
    """Iterations between evaluations on the eval prompts (and after the last)."""
    eval_episodes: int = 128
    """Episodes per evaluation in each process."""
    device: str | None = None
    """'cpu', 'cuda', ... (default: CUDA when available)."""
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
    """torch's CPU threads per process. Default: 1 for a policy under 50M parameters on the CPU (on 2 busy cores
    two threads ran the default task 2.5-3.4x slower than one; idle, up to 1.5x faster), else torch's choice."""
    allow_existing_run_dir: bool = False
    """Start a run in a non-empty directory that holds no textenv run (its files are left alone)."""
    max_skipped_updates: int = 3
    """Stop with an error after this many updates in a row whose gradients were all NaN or inf."""
    trust_run_config: bool = False
    """--resume: import the reward functions, step reward function and interaction that config.json names without
    their being named again on the command line (importing runs a module's code). Code inside run_dir is never
    imported, and standard-library callables (os:system) never serve as reward functions."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise on a setting out of range or of the wrong type, naming the field."""
        for name in ("iterations", "batch_size", "checkpoint_every", "eval_every", "eval_episodes"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("seed", "lora_rank"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("max_skipped_updates", self.max_skipped_updates, minimum=1)
        if self.token_budget is not None:
            check_int("token_budget", self.token_budget, minimum=1)
        if self.threads is not None:
            check_int("threads", self.threads, minimum=1)
        if self.value_layer is not None:
            check_int("value_layer", self.value_layer, minimum=1)
            if not self.share_backbone:
                raise ValueError(
                    "--value-layer is for a value head on the policy's trunk; with --no-share-backbone the critic's "
                    "head reads its own trunk's last hidden state: drop --value-layer"
                )
        check_float("lora_alpha", self.lora_alpha, "> 0", lambda v: v > 0)
        if self.value_prior is not None:
            check_choice("value_prior", self.value_prior, ValuePrior)
        if self.critic_init is not None:
            check_choice("critic_init", self.critic_init, CriticInit)
            if self.share_backbone:
                raise ValueError(
                    f"--critic-init {self.critic_init} is for a separate critic trunk; with a shared backbone the "
                    "critic is a head on the policy's trunk: add --no-share-backbone or drop --critic-init"
                )


@dataclass
class TrainConfig:
    env: TokenEnvConfig = field(default_factory=TokenEnvConfig)
    """The task (TokenRLHF-v0's settings); the fields left unset take the task's values (resolve_config)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self.validate_combination()

    def validate(self, import_functions: bool = True) -> None:
        """Raise on a configuration that cannot run, before any work; messages name the field. With
        ``import_functions``, then ``check_functions``."""
        for part in (self.env, self.ppo, self.kl, self.run):
            part.validate()  # fields may have been set after construction
        self.validate_combination()
        policy = self.run.policy
        if policy is not None and looks_like_path(policy) and not Path(policy).expanduser().is_dir():
            raise FileNotFoundError(
                f"--policy {policy!r} is not a directory: pass the directory of a saved causal LM, or a hub name"
            )
        for name, path in (("prompts", self.env.prompts), ("eval_prompts", self.run.eval_prompts)):
            if isinstance(path, str):
                read_prompts(path, self.env.prompt_column, what="--" + name.replace("_", "-"))
        check_recordable(self.env)
        resolve_precision(self.env.precision, resolve_device(self.run.device))  # bf16 where the device lacks it
        if import_functions:
            self.check_functions()

    def check_functions(self) -> None:
        """Check every function or interaction named as ``module:function`` text without importing it (none from
        the standard library, none from inside run_dir: ``check_code_name``), then import the reward functions and
        check their weights, before loading anything."""
        for what, spec in code_names(self.env):
            check_code_name(spec, what, untrusted_dirs=(self.run.run_dir,))
        if self.env.reward_fns:
            resolve_reward_fns(self.env.reward_fns, self.env.reward_weights)

    def validate_combination(self) -> None:
        ppo, run = self.ppo, self.run
        if run.batch_size % ppo.minibatch_size:
            raise ValueError(
                f"batch_size ({run.batch_size}) must be a multiple of minibatch_size ({ppo.minibatch_size})"
            )
        if ppo.uses_groups and (ppo.group_size < 2 or run.batch_size % ppo.group_size):
            raise ValueError(
                f"{ppo.algo} needs group_size >= 2 dividing batch_size ({run.batch_size}); got {ppo.group_size}"
            )
        if run.value_prior == "score" and not ppo.uses_critic:
            raise ValueError(
                f"--value-prior score is the critic's, and --algo {ppo.algo} has none: drop --value-prior or use "
                "--algo ppo"
            )
        if run.fsdp and run.lora_rank:
            raise ValueError("--fsdp with --lora-rank is not supported: LoRA already keeps the trained state small")


def train(config: TrainConfig) -> Path:
    """Run (or resume) PPO as configured; returns the directory of the final policy.

    SIGINT (Ctrl-C) or SIGTERM ends the iteration in progress, writes a checkpoint and
    raises ``TrainingStopped``; ``--resume`` continues from there. An exception in an
    iteration (a reward function's, an interaction's) raises ``TrainingFailed``, which
    names what raised; the last completed iteration is then in a checkpoint (one is
    written if ``checkpoint_every`` skipped it), or, when none completed, a run directory
    this run made is removed.
    """
    with keep_torch_threads(), StopSignals() as stop:
        t = Trainer(config)
        run = config.run
        last = t.start - 1
        for iteration in t.progress_bar():
            if t.budget_spent():
                break  # a resumed run that had already spent its budget
            began = time.perf_counter()
            states, t.updating = t.generator_states(), False
            try:  # user code runs here (reward functions, interactions): a failure is reported with a way on
                metrics, rollout = t.iterate(iteration)
            except Exception as error:
                raise t.failed(error, iteration, last, states if not t.updating else None) from error
            metrics["perf/iteration_s"] = time.perf_counter() - began
            metrics = t.gather_metrics(iteration, metrics)
            t.kl_controller.update(metrics["env/kl"], len(rollout.actions) * t.dist.world_size)
            t.tokens += t.dist.sum(int(rollout.mask.sum()))
            metrics["perf/tokens_total"] = t.tokens
            t.log(iteration, metrics, rollout)
            t.check_update(metrics)
            done = iteration == run.iterations - 1 or t.budget_spent()
            stopping = stop.requested(t.dist)
            if (iteration + 1) % run.checkpoint_every == 0 or done or stopping:
                t.save_checkpoint(iteration)
            t.dist.barrier()
            last = iteration
            if stopping:
                t.stop(stop.signal_name, iteration)
            if done:
                break
        try:
            return t.finish(last + 1)
        except Exception as error:
            raise t.failed(error, None, last, None) from error


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Give torch its thread count back afterwards: training sets its own (see ``default_threads``)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class TrainingStopped(Exception):
    """Training ended early on SIGINT or SIGTERM, after writing a checkpoint. ``exit_code``: 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingFailed(RuntimeError):
    """An iteration raised (a reward function, an interaction, a model...): the message says what raised it and how
    to continue; the cause is the original exception. ``internal``: it came from textenv's own code, not a callable
    it was given (a traceback then helps)."""

    exit_code = 1

    def __init__(self, message: str, internal: bool):
        super().__init__(message)
        self.internal = internal


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the iteration in progress; a second SIGINT stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: no more waiting
        self.signal = signum

    def requested(self, dist: Distributed) -> bool:
        """Whether any process was asked to stop (all of them then stop at the same iteration)."""
        return dist.sum(int(self.signal is not None)) > 0

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Everything the loop of ``train`` uses, built (or resumed) from a ``TrainConfig``."""

    def __init__(self, config: TrainConfig):
        config.validate(import_functions=not config.run.resume)  # on --resume, names are compared before importing
        self.config, run = config, config.run
        self.dist = dist = Distributed(resolve_device(run.device), fsdp=run.fsdp)
        self.device, self.run_dir = dist.device, Path(run.run_dir)
        self.checkpoints = Checkpoints(self.run_dir)
        self.updating = False  # within an iteration: whether its update has begun (see ``failed``)
        if run.resume:
            resumed = self.checkpoints.resume()
            check_resumed_config(config, self.run_dir)
            config.check_functions()
        else:
            check_new_run_dir(self.run_dir, self.checkpoints, run.allow_existing_run_dir)
            resumed = None
        self.rate_key = score_rate_key(config.env)  # positive_rate on the review task, score_gt0_rate elsewhere

        torch.manual_seed(run.seed)  # the same initial weights on every rank
        self.agent = build_agent(config, None if resumed is None else resumed.directory / "agent", self.device)
        torch.set_num_threads(run.threads or default_threads(self.agent.policy, self.device))
        self.env, self.eval_env = build_envs(config, self.agent, self.device)
        if resumed is None and uses_value_prior(config, self.env.unwrapped):  # a resumed agent has it, or not
            self.agent.add_value_prior()
        self.model = dist.wrap(self.agent)
        env = self.env.unwrapped.config  # resolved: the task's limits filled in
        # the constant L of --loss-aggregation constant: the most steps an episode can take (replies are not steps)
        self.agent_tokens = env.agent_tokens(turns=env.interaction is not None)
        self.max_turns = env.max_turns if env.interaction is not None else None  # the per-turn metrics' turns
        self.autocast = agent_autocast(config.env.precision, self.device)
        groups = parameter_groups(self.model, self.agent, config.ppo.value_lr_scale)
        # fused: one kernel over all parameters instead of a loop of small ops per tensor (4x faster a step on the
        # default task, 8x at GPT-2-small size on one CPU thread); a checkpoint's saved setting wins on --resume
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(groups, lr=config.ppo.learning_rate, eps=1e-5, fused=fused or None)
        self.kl_controller = config.kl.controller(config.env.kl_coef)
        self.seed = dist.seed(run.seed)
        self.sampling = torch.Generator(device=self.device).manual_seed(self.seed)
        self.shuffling = torch.Generator().manual_seed(self.seed + 1)
        self.start, self.tokens = 0, 0
        if resumed is not None:
            self.restore(resumed)
        self.skipped_updates = 0  # updates in a row whose every optimizer step had a non-finite gradient
        self.made_run_dir = not self.run_dir.exists()  # removed again if no iteration completes
        if dist.is_main:  # only now, with everything loaded: a failed start leaves no run directory behind
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(self.run_dir / CONFIG_FILE, json.dumps(asdict(config), indent=2, default=describe) + "\n")
        dist.barrier()
        self.logger = RunLogger(self.run_dir, self.start) if dist.is_main else None
        self.raw_metrics = self.run_dir / f"metrics-rank{dist.rank}.jsonl" if dist.enabled else None
        if self.raw_metrics is not None and self.raw_metrics.exists():  # a resumed run: keep what the checkpoint covers
            kept = [row for row in read_jsonl(self.raw_metrics) if row["iteration"] < self.start]
            write_atomically(self.raw_metrics, "".join(json.dumps(row) + "\n" for row in kept))

    def restore(self, resumed) -> None:
        state = resumed.state
        if state.world_size != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.world_size} processes; resume it with as many "
                f"(got {self.dist.world_size})"
            )
        self.dist.load_optimizer_state(self.model, self.optimizer, resumed.optimizer)
        for generator, saved in zip((self.sampling, self.shuffling), resumed.generators[self.dist.rank]):
            generator.set_state(saved)
        self.start, self.kl_controller.value, self.tokens = state.iteration + 1, state.kl_coef, state.tokens

    def generator_states(self) -> list[Tensor]:
        """The sampling and shuffling generators' states (a failed iteration's checkpoint takes them back)."""
        return [self.sampling.get_state(), self.shuffling.get_state()]

    def failed(self, error: Exception, iteration: int | None, last: int, states: list[Tensor] | None):
        """After ``error`` in ``iteration`` (None: in the final evaluation): ``TrainingFailed``, saying what raised
        and how to continue, with the run left resumable.

        ``last`` is the last completed iteration; ``states`` the generators' states before
        the failed one, or None once its update had begun (the weights are then no longer
        ``last``'s). When ``last`` completed in this process and has no checkpoint
        (``checkpoint_every``), one is written from ``states``, so that ``--resume`` goes
        on as if the failed iteration had not begun. When no iteration completed, a run
        directory this run made is removed (a new run may then start in it again).
        """
        where = "the final evaluation" if iteration is None else f"iteration {iteration}"
        what, internal = failure_source(error)
        self.bar.close()
        checkpoint = self.checkpoints.latest()
        single = not self.dist.enabled  # under torchrun a checkpoint is a collective: the others cannot join
        if single and last >= self.start and states is not None and checkpoint != self.checkpoints.path(last):
            for generator, state in zip((self.sampling, self.shuffling), states):
                generator.set_state(state)
            self.save_checkpoint(last)
            checkpoint = self.checkpoints.latest()
        if self.logger is not None:
            self.logger.close()
        if checkpoint is not None:
            how = (
                f"The checkpoint {checkpoint} holds iteration {int(checkpoint.name.split('-')[1])}: fix the cause and "
                f"continue with --run-dir {self.run_dir} --resume"
            )
        elif single and self.made_run_dir and last < self.start:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            how = f"No iteration completed, so {self.run_dir} was removed: fix the cause and start the run again"
        else:
            how = f"No iteration completed and {self.run_dir} holds no checkpoint: fix the cause and start again"
        return TrainingFailed(f"{where} failed: {what}. {how}", internal)

    def iterate(self, iteration: int) -> tuple[dict[str, float], Rollout]:
        """One iteration: the evaluation (every ``eval_every``; iteration 0 evaluates the SFT policy), a rollout
        and the update, with their metrics. ``updating`` says whether the update had begun."""
        ppo, temperature = self.config.ppo, self.config.env.temperature
        metrics = self.evaluate(iteration) if iteration % self.config.run.eval_every == 0 else {}
        beta = self.kl_controller.value
        self.env.kl_coef = beta if ppo.kl_penalty == "reward" else 0.0  # "loss": the KL is a loss term; "none": none
        self.set_learning_rate(iteration)
        self.agent.eval()
        began = time.perf_counter()
        group_size = ppo.group_size if ppo.uses_groups else None
        rollout = collect_rollout(
            self.agent, self.env, temperature, self.seed + iteration, self.sampling, self.autocast, group_size
        )
        metrics["perf/tokens_per_s"] = float(rollout.mask.sum()) / (time.perf_counter() - began)
        self.model.train()
        self.updating = True
        metrics |= ppo_update(
            self.model,
            self.optimizer,
            rollout,
            ppo,
            temperature,
            self.shuffling,
            self.autocast,
            kl_coef=beta,
            max_new_tokens=self.agent_tokens,
            max_turns=self.max_turns,
        )
        self.optimizer.zero_grad(set_to_none=True)  # the next rollout does not carry the last step's gradients
        if self.agent.value_prior:
            weight = self.agent.prior_weight.detach()
            metrics["ppo/prior_weight"] = float(weight.full_tensor() if hasattr(weight, "full_tensor") else weight)
        return metrics | rollout_metrics(rollout, "env", self.rate_key), rollout

    def set_learning_rate(self, iteration: int) -> None:
        """The learning rate of ``iteration`` (``learning_rate``), times each parameter group's ``lr_scale``."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, iteration) * group.get(LR_SCALE, 1.0)

    def check_update(self, metrics: dict[str, float]) -> None:
        """Stop when too many updates in a row were skipped for NaN or inf gradients (one may be a fluke)."""
        all_skipped = metrics["ppo/skipped_steps"] == metrics["ppo/steps"]
        self.skipped_updates = self.skipped_updates + 1 if all_skipped else 0
        if self.skipped_updates >= self.config.run.max_skipped_updates:
            raise FloatingPointError(
                f"{self.skipped_updates} updates in a row had NaN or inf gradients in every step, so none was "
                f"applied; the last good checkpoint is {self.checkpoints.latest()}. Lower --learning-rate, check "
                "the reward model's scores, or raise --max-skipped-updates"
            )

    def budget_spent(self) -> bool:
        budget = self.config.run.token_budget
        return budget is not None and self.tokens >= budget

    def evaluate(self, iteration: int) -> dict[str, float]:
        generator = torch.Generator(device=self.device).manual_seed(eval_seed(self.seed, iteration))
        episodes = self.config.run.eval_episodes
        temperature = self.config.env.temperature
        return evaluate(self.agent, self.eval_env, temperature, episodes, generator, self.autocast, self.rate_key)

    def gather_metrics(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """This rank's metrics (kept raw under torchrun), averaged over ranks, plus the loop's own state."""
        if self.raw_metrics is not None:
            with self.raw_metrics.open("a") as f:
                f.write(json.dumps({"iteration": iteration, **metrics}) + "\n")
        metrics = self.dist.mean_metrics(metrics)
        in_reward = self.config.ppo.kl_penalty == "reward"  # else the rewards hold no KL: it is a loss term
        metrics["env/non_score_reward"] = -self.kl_controller.value * metrics["env/kl"] if in_reward else 0.0
        metrics["kl/coef"] = self.kl_controller.value
        metrics["perf/lr"] = self.optimizer.param_groups[0]["lr"]
        if not self.dist.fsdp:  # FSDP ranks hold different shards by design
            metrics["dist/parameter_spread"] = self.dist.parameter_spread(self.agent)
        return metrics

    def progress_bar(self) -> tqdm:
        run = self.config.run
        self.bar = tqdm(
            range(self.start, run.iterations),
            desc=self.config.ppo.algo.upper(),
            disable=not (run.progress and self.dist.is_main),
            initial=self.start,
            total=run.iterations,
        )
        return self.bar

    def stop(self, signal_name: str, iteration: int) -> None:
        """After the checkpoint of ``iteration``: close what is open and raise ``TrainingStopped``."""
        self.bar.close()
        if self.logger is not None:
            self.logger.plot()
            self.logger.close()
        self.dist.shutdown()
        raise TrainingStopped(
            f"stopped by {signal_name} after iteration {iteration}; checkpoint {self.checkpoints.latest()}; "
            f"continue with --run-dir {self.run_dir} --resume",
            exit_code=128 + signal.Signals[signal_name].value,
        )

    def log(self, iteration: int, metrics: dict[str, float], rollout: Rollout) -> None:
        if not self.dist.is_main:
            return
        self.logger.log(iteration, metrics, logged_samples(rollout, self.env.unwrapped.tokenizer))
        self.bar.set_postfix(
            score=f"{metrics['env/score']:+.2f}",
            pos=f"{metrics['env/' + self.rate_key]:.0%}",
            kl=f"{metrics['env/kl']:.2f}",
        )
        if iteration % self.config.run.eval_every == 0:
            self.logger.plot(wait=False)  # off the training thread: the drawing would stall this iteration

    def save_checkpoint(self, iteration: int) -> None:
        """A collective under torchrun (generator states and FSDP shards are gathered); rank 0 writes."""
        generators = self.dist.gather([self.sampling.get_state(), self.shuffling.get_state()])
        agent = self.dist.full_agent(self.model, self.agent)
        optimizer = self.dist.optimizer_state(self.model, self.optimizer)
        if self.dist.is_main:
            state = TrainerState(iteration, self.kl_controller.value, self.tokens, self.dist.world_size)
            self.checkpoints.save(iteration, agent, optimizer, generators, state)

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


def logged_samples(rollout: Rollout, tokenizer, count: int = 4) -> list[dict]:
    """The first ``count`` episodes as ``samples.jsonl`` rows: ``prompt`` is what the policy saw (its prompt ids,
    decoded: after ``prompt_truncation='left'``, the kept tail); ``prompt_text``, the prompt as given, where that
    differs; and per token after the prompt (``python -m agents.viewer`` colours them): ``tokens`` (each decoded
    alone), ``env`` (the environment's tokens), ``logprob``, ``ref_logprob``, ``kl`` and ``reward`` (None on the
    environment's tokens, which are not steps)."""
    samples = []
    for row in range(min(count, len(rollout.responses))):
        seen = tokenizer.decode(rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist())
        sample = {"prompt": seen, "response": rollout.responses[row], "score": float(rollout.scores[row])}
        if seen != rollout.prompts[row]:
            sample["prompt_text"] = rollout.prompts[row]
        samples.append(sample | per_token(rollout, row, tokenizer))
    return samples


def per_token(rollout: Rollout, row: int, tokenizer) -> dict[str, list]:
    """Episode ``row``'s tokens after its prompt, and the step numbers of each (None on the environment's tokens)."""
    steps = rollout.mask[row]
    env = rollout.env_mask[row] if rollout.env_mask is not None else torch.zeros_like(steps)
    length = int(torch.nonzero(steps | env).max()) + 1 if bool((steps | env).any()) else 0
    columns = {"logprob": rollout.logprobs, "ref_logprob": rollout.ref_logprobs, "kl": rollout.kl}
    columns["reward"] = rollout.rewards
    found = {"tokens": [tokenizer.decode([t]) for t in rollout.actions[row, :length].tolist()]}
    found["env"] = env[:length].tolist()
    for name, values in columns.items():
        found[name] = [float(v) if step else None for v, step in zip(values[row, :length].tolist(), steps[:length])]
    return found


def failure_source(error: BaseException) -> tuple[str, bool]:
    """What raised ``error``, in words, and whether it came from textenv's own code.

    A reward function's error names the function itself; any other names the callable that
    textenv's code called when it was raised (an interaction's ``respond``, a model's
    forward), with the file and line where it was raised.
    """
    cause = error.__cause__ if isinstance(error, RewardFunctionError) and error.__cause__ is not None else error
    frames = [frame for frame, _ in traceback.walk_tb(cause.__traceback__)]
    ours = [i for i, frame in enumerate(frames) if is_own_code(frame.f_code.co_filename)]
    if not frames or (ours and ours[-1] == len(frames) - 1):  # raised by textenv itself: a check's message says
        return f"{type(error).__name__}: {error}", not isinstance(error, ValueError | TypeError)  # what was wrong
    code = frames[ours[-1] + 1 if ours else 0].f_code
    innermost = traceback.extract_tb(cause.__traceback__)[-1]
    at = f"(at {innermost.filename}:{innermost.lineno})"
    if cause is not error:  # the reward function's own message; the hint on its arguments only where they failed
        text = str(error) if isinstance(cause, TypeError) else str(error).split(". It is called with")[0]
        return f"{text} {at}", False
    return f"{getattr(code, 'co_qualname', code.co_name)} raised {type(error).__name__}: {error} {at}", False


def is_own_code(filename: str) -> bool:
    """Whether ``filename`` belongs to textenv's packages (textenv/, agents/)."""
    path = Path(filename).resolve()
    return any(root in path.parents for root in OWN_CODE)


OWN_CODE = tuple(Path(module.__file__).resolve().parent for module in (sys.modules["textenv"], sys.modules["agents"]))


LR_SCALE = "lr_scale"
"""The key of a parameter group's multiple of the learning rate (Adam keeps it with the group, and a checkpoint)."""


PRIOR_LR_SCALE = 100.0
"""The value prior's weight's learning rate, as a multiple of learning_rate. One scalar that must follow the
policy: as the actor improves, the reward model's score of an early prefix says less of the return (the actor
turns most openings positive), and at the trunk's rate Adam would move the weight about 3e-4 a step, 0.1 over a
60-iteration run. At 100x it falls from 1 to 0.43-0.61 over the default task's first 30 iterations (seeds 0-4),
and the critic explained more of the returns than at 30x or 300x (docs/design.md)."""


def parameter_groups(model: torch.nn.Module, agent: ActorCritic, value_lr_scale: float) -> list[dict]:
    """Adam's parameter groups of ``model`` (the agent, or its DDP/FSDP wrapper): its trainable parameters; with a
    ``value_lr_scale`` other than 1, the value head's in a group of their own at that multiple of the rate; with a
    value prior, its weight in a group of its own at ``PRIOR_LR_SCALE``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    scaled = []  # (the ids of a group's parameters, its scale), each apart from the rest
    if value_lr_scale != 1:
        scaled.append(({id(p) for p in agent.value_head.parameters()}, value_lr_scale))
    if agent.value_prior:
        scaled.append(({id(agent.prior_weight)}, PRIOR_LR_SCALE))
    if not scaled:
        return [{"params": trainable}]  # one group, as every run had before the scale existed
    apart = set().union(*(ids for ids, _ in scaled))
    groups = [{"params": [p for p in trainable if id(p) not in apart], LR_SCALE: 1.0}]
    return groups + [{"params": [p for p in trainable if id(p) in ids], LR_SCALE: scale} for ids, scale in scaled]


def uses_value_prior(config: TrainConfig, env) -> bool:
    """Whether a new run's critic adds the reward model's prefix scores to its values (``RunConfig.value_prior``,
    None resolved), ``env`` the training env; --value-prior score where it cannot apply is refused, naming why."""
    choice = config.run.value_prior
    if choice == "none" or (choice is None and not config.run.share_backbone):
        return False
    obstacle = value_prior_obstacle(config, env)
    if choice == "score" and obstacle is not None:
        raise ValueError(f"--value-prior score: {obstacle}; drop it (or pass --value-prior none)")
    return obstacle is None


def value_prior_obstacle(config: TrainConfig, env) -> str | None:
    """Why the reward model's prefix scores cannot serve the critic of this run, or None where they can."""
    if not config.ppo.uses_critic:
        return f"--algo {config.ppo.algo} has no critic"
    if env.reward_model is not None and env.config.reward_mode != "sparse":
        return "with --reward-mode dense the rewards already pay each prefix's score (a prior would count it twice)"
    return env.prefix_scores_obstacle()  # the env's own rule: a causal reward model of the policy's tokens


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """The learning rate of ``iteration``: linear decay from ``learning_rate`` at iteration 0 to 0 at ``iterations``,
    from the settings as they are now. So a resumed run follows the schedule its settings say: with the same
    iterations, the rates of the run that was not stopped; with others, the schedule of the new value from the
    first resumed iteration on."""
    return config.ppo.learning_rate * max(0.0, 1 - iteration / config.run.iterations)


def eval_seed(seed: int, iteration: int) -> int:
    """The seed of the sampling generator of the evaluation before ``iteration`` (and after the last), from the
    process's seed: ``python -m agents.evaluate --seed`` with this value samples the same episodes."""
    return seed + 10**6 + iteration


SMALL_MODEL_PARAMETERS = 50_000_000


def default_threads(policy: torch.nn.Module, device: torch.device) -> int:
    """One thread for a small model on the CPU: it loses little when the CPU is idle and does not collapse when
    other processes compete for the cores (OpenMP threads then wait on each other); else torch's own choice."""
    small = sum(p.numel() for p in policy.parameters()) < SMALL_MODEL_PARAMETERS
    return 1 if device.type == "cpu" and small else torch.get_num_threads()


CONFIG_FILE = "config.json"
# What --resume may change: how long the run goes on, how often it saves and evaluates, how it shows progress.
RESUMABLE_CHANGES = {
    "run.iterations",
    "run.token_budget",
    "run.checkpoint_every",
    "run.eval_every",
    "run.progress",
    "run.threads",
    "run.resume",
    "run.allow_existing_run_dir",
    "run.max_skipped_updates",
    "run.trust_run_config",
    "run.run_dir",  # the run is the directory --resume names, however named (relative, absolute) or wherever moved
}
# Settings that hold a path: the same file or folder named another way (relative, absolute) is no change.
PATH_SETTINGS = {
    "run.policy",
    "run.tokenizer",
    "run.eval_prompts",
    "env.prompts",
    "env.reward_model",
    "env.reward_tokenizer",
}
# The settings that name code to import, as (field, what it is, its flag).
CODE_SETTINGS = (
    ("reward_fns", "reward function", "--reward-fn"),
    ("step_reward_fn", "step_reward_fn", "--step-reward-fn"),
    ("interaction", "interaction", "--interaction"),
)


def flat_config(config: TrainConfig | dict) -> dict[str, object]:
    """``{"run.batch_size": 64, ...}``, as ``config.json`` stores it (paths and objects as text)."""
    data = json.loads(json.dumps(asdict(config) if not isinstance(config, dict) else config, default=describe))
    return {f"{part}.{key}": value for part, fields in data.items() for key, value in fields.items()}


def saved_config(run_dir: Path) -> dict:
    """``config.json`` of a run as written (``read_run_config`` completes and checks it)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"--resume: cannot read {path} ({error}); it records the run's settings") from error
    if not isinstance(data, dict) or not all(isinstance(part, dict) for part in data.values()):
        raise ValueError(f"--resume: {path} is not a run's settings ({{'env': {{...}}, 'ppo': ...}}); was it edited?")
    return data


def read_run_config(run_dir: Path) -> tuple[dict, list[str]]:
    """A run's ``config.json``, with each setting it lacks at its default, and notes that name those.

    A setting this version added since the run was written is missing there: it takes its
    default (the run ran without it). A setting this version does not know (written by a
    newer version, or edited in) is refused, each named.
    """
    data, path = saved_config(run_dir), Path(run_dir) / CONFIG_FILE
    retire_bf16(data)
    defaults = json.loads(json.dumps(asdict(TrainConfig()), default=describe))
    unknown = [f"{part}.{key}" for part, values in data.items() for key in values if key not in defaults.get(part, {})]
    unknown += [part for part in data if part not in defaults]
    if unknown:
        raise ValueError(
            f"--resume: {path} holds settings this version of textenv does not know: {', '.join(sorted(unknown))} "
            "(written by a newer version, or edited by hand). Resume with the version that wrote it, or remove them "
            "from config.json if the run should go on without them"
        )
    notes, completed = [], {}
    for part, values in defaults.items():
        completed[part] = dict(data.get(part, {}))
        for key, value in values.items():
            if key not in completed[part]:
                completed[part][key] = value
                notes.append(f"{part}.{key} = {value!r}")
    if notes:
        notes = [
            f"note: {path} has no {', '.join(notes)} (settings added since the run was written); the resumed run "
            "takes these defaults"
        ]
    return completed, notes


def retire_bf16(data: dict) -> None:
    """A run written before --precision records run.bf16 (bf16 autocast on CUDA only): true was what precision's
    default does, false is fp32."""
    run, env = data.get("run"), data.get("env")
    if isinstance(run, dict) and "bf16" in run and isinstance(env, dict) and "precision" not in env:
        env["precision"] = None if run.pop("bf16") else "fp32"


def same_setting(key: str, saved, given) -> bool:
    """Whether a setting is unchanged: equal, or for a path the same file or folder named another way."""
    if saved == given:
        return True
    if key not in PATH_SETTINGS or not isinstance(saved, str) or not isinstance(given, str):
        return False
    first, second = Path(saved).expanduser(), Path(given).expanduser()
    if not (first.exists() and second.exists()):
        return False  # hub names, or nothing there to compare
    return first.resolve() == second.resolve()


def check_resumed_config(config: TrainConfig, run_dir: Path) -> None:
    """A resumed run keeps its settings: any difference outside ``RESUMABLE_CHANGES`` is refused, each named.

    Nothing is imported: functions are compared by the ``module:function`` names config.json records. Settings
    config.json lacks take their defaults (``read_run_config``, whose note is printed to stderr).
    """
    completed, notes = read_run_config(run_dir)
    for note in notes:
        print(note, file=sys.stderr)
    saved, given = flat_config(completed), flat_config(config)
    keys = sorted(saved.keys() | given.keys())
    changed = [key for key in keys if not same_setting(key, saved.get(key), given.get(key))]
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        listing = "; ".join(f"{key.split('.', 1)[1]}: {saved.get(key)!r} -> {given.get(key)!r}" for key in refused)
        raise ValueError(
            f"--resume: these settings differ from the run's {run_dir / CONFIG_FILE}: {listing}. A resumed run "
            "continues with its own settings (the command line takes them from config.json); only "
            f"{', '.join(sorted(k.split('.', 1)[1] for k in RESUMABLE_CHANGES))} may change"
        )


def is_textenv_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the config.json of a textenv training run (a model's config.json does not count)."""
    try:
        return {"env", "ppo", "run"} <= set(json.loads((run_dir / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return False


def check_new_run_dir(run_dir: Path, checkpoints: Checkpoints, allow_existing: bool) -> None:
    """A new run goes into a new or empty directory, or one of an earlier textenv run that never checkpointed."""
    if checkpoints.latest() is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir"
        )
    if not run_dir.exists() or allow_existing:
        return
    if not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir {run_dir} is a file; choose a directory")
    if any(run_dir.iterdir()) and not is_textenv_run(run_dir):
        raise FileExistsError(
            f"--run-dir {run_dir} is not empty and holds no textenv run; choose another directory, or pass "
            "--allow-existing-run-dir to write into it (its other files are left alone)"
        )


def policy_source(run: RunConfig, env: TokenEnvConfig) -> str:
    """The policy's directory as an absolute path (a LoRA run's adapters then name a base that loads from
    anywhere), or its hub name: --policy, else the resolved ``env``'s reference model (the task's SFT policy)."""
    source = run.policy if run.policy is not None else env.reference_model
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else str(source)


def critic_source(run: RunConfig, env: TokenEnvConfig, policy_type: str) -> str:
    """Where a separate critic trunk starts (``run.critic_init``): the reward model's directory when it has the
    policy's architecture (``policy_type``; Stiennon et al. 2020) unless told 'policy', else the policy's directory
    (not its module: with LoRA the module holds adapters a trunk has no place for). 'reward' where the reward model
    cannot serve is refused."""
    reward_source = env.reward_model
    same_trunk = reward_source is not None and load_config(reward_source, "reward model").model_type == policy_type
    if run.critic_init == "reward" and not same_trunk:
        why = f"the reward model ({reward_source}) does not have the policy's architecture ({policy_type})"
        if reward_source is None:
            why = "the task has no reward model"
        raise ValueError(f"--critic-init reward: {why}, so the critic cannot start from it; pass --critic-init policy")
    return reward_source if same_trunk and run.critic_init != "policy" else policy_source(run, env)


def build_agent(config: TrainConfig, saved: Path | None, device: torch.device) -> ActorCritic:
    """The trainable actor-critic: from a checkpoint, or the policy (with LoRA adapters if asked) and a new critic
    (a separate trunk from ``critic_source``)."""
    run = config.run
    if saved is not None:
        agent = ActorCritic.from_pretrained(saved)
    else:
        env = resolve_config(config.env)
        policy = load_policy(policy_source(run, env))
        if run.lora_rank:
            targets = run.lora_target_modules.split(",") if run.lora_target_modules else None
            policy = add_lora(policy, run.lora_rank, run.lora_alpha, targets)
        critic_init = None if run.share_backbone else critic_source(run, env, policy.config.model_type)
        agent = ActorCritic.from_models(
            policy, share_backbone=run.share_backbone, critic_init=critic_init, value_layer=run.value_layer
        )
    agent.to(device).train()
    if run.gradient_checkpointing:
        agent.policy.gradient_checkpointing_enable()
    return agent


def build_envs(config: TrainConfig, agent: ActorCritic, device: torch.device):
    """The training and evaluation envs, on the resolved env config; they share one set of frozen models.

    The reference model is the starting policy (with LoRA: the policy's own base,
    adapters off, with no second copy of the weights).
    """
    run, env = config.run, resolve_config(config.env)
    source = policy_source(run, env)
    reference = AdaptersDisabled(agent.policy) if run.lora_rank else source
    env_config = replace(env, reference_model=reference, tokenizer=run.tokenizer or source, device=device)
    train_env = make_rollout_env(run.batch_size, env_config)
    frozen = train_env.unwrapped
    # the loaded reward model has no directory to find its own tokenizer in: the eval env gets the one the training
    # env found (None: the reward model reads the policy's token ids in both)
    own_tokenizer = None
    if frozen.reward_model is not None:
        own_tokenizer = reward_model_tokenizer(env.reward_tokenizer, env.reward_model, frozen.tokenizer)
    eval_prompts = run.eval_prompts or eval_prompt_source(config.env, run.eval_split)
    eval_config = replace(
        env_config,
        prompts=eval_prompts,
        split=eval_split(eval_prompts, run.eval_split),
        reference_model=frozen.reference_model,
        reward_model=frozen.reward_model,
        reward_tokenizer=own_tokenizer,
        tokenizer=frozen.tokenizer,
    )
    return train_env, make_rollout_env(run.eval_episodes, eval_config)


def eval_prompt_source(env: TokenEnvConfig, split: str):
    """Where the eval prompts come from without --eval-prompts: the task's split (prompts unset), a saved
    dataset dict's split, or else the training prompts themselves (with a warning: nothing is held out)."""
    prompts = env.prompts
    if prompts is None:
        return None
    is_dataset_dir = isinstance(prompts, str | Path) and Path(prompts).expanduser().is_dir()
    if is_dataset_dir or hasattr(prompts, "column_names"):
        return prompts
    warnings.warn(
        "no --eval-prompts given and the prompts have no eval split: evaluating on the training prompts",
        stacklevel=2,
    )
    return prompts


def cli(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """The training command line: every field of ``TrainConfig``, without group prefixes.

    With ``--resume`` the run's own ``config.json`` gives the defaults, so the flags
    given are exactly the changes asked for (and checked: see ``RESUMABLE_CHANGES``).
    The names of code in config.json (``--reward-fn``, ``--step-reward-fn``,
    ``--interaction``) are not taken as defaults: importing one runs it, so a resumed run
    imports only what the command line names again (it must be what config.json names),
    or with ``--trust-run-config`` what config.json names (``take_code_settings``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    check_no_bf16_flag(argv)
    options = dict(config=(tyro.conf.OmitArgPrefixes,), description=description)
    config = tyro.cli(TrainConfig, args=argv, **options)
    if config.run.resume and (config.run.run_dir / CONFIG_FILE).is_file():
        saved = config_from_json(read_run_config(config.run.run_dir)[0])
        unnamed = {name: () if name == "reward_fns" else None for name, *_ in CODE_SETTINGS}
        default = replace(saved, env=replace(saved.env, **unnamed), run=replace(saved.run, trust_run_config=False))
        config = tyro.cli(TrainConfig, args=argv, default=default, **options)
        config.env = take_code_settings(saved.env, config.env, config.run.trust_run_config, config.run.run_dir)
        return config
    check_flags_against_recipe(config.ppo, argv)
    recipe_chose = config.ppo.recipe is not None  # a recipe sets its estimator with its KL placement
    if (
        config.ppo.kl_penalty == "loss"
        and not recipe_chose
        and not any(arg.startswith("--kl-estimator") for arg in argv)
    ):
        print(
            f"note: --kl-penalty loss uses --kl-estimator {config.ppo.kl_estimator} (k1's gradient as a loss term "
            "is about 0: it would apply almost no KL); --kl-estimator k2 or k3 chooses",
            file=sys.stderr,
        )
    return config


def check_no_bf16_flag(argv: list[str]) -> None:
    """Refuse --bf16 and --no-bf16, naming the flag that replaced them."""
    for arg in argv:
        if arg.split("=")[0] in ("--bf16", "--no-bf16"):
            raise ValueError(
                f"{arg} was replaced by --precision bf16|fp32 (one setting for every device: bf16 autocast on a GPU "
                "or a CPU with bf16 instructions, and the frozen models stored in bf16)"
            )


def check_flags_against_recipe(ppo: PPOConfig, argv: list[str]) -> None:
    """Refuse a flag whose value the recipe (or advantage_scaling 'none') replaced, naming both settings.

    ``PPOConfig`` refuses a field given a value other than its default and the recipe's, but
    cannot tell a value given at its default from one left there: the command line can.
    """
    for name, (value, source) in ppo.implied_settings().items():
        given = flag_value(argv, "--" + name.replace("_", "-"))
        if given is not NOT_GIVEN and given != value:
            raise ValueError(
                f"{source} sets {name}={value!r}, but --{name.replace('_', '-')} {given!r} was given: drop one of "
                "the two settings"
            )


NOT_GIVEN = object()


def flag_value(argv: list[str], flag: str):
    """The value the last ``flag`` in ``argv`` gives (``--flag``/``--no-flag`` for a bool; None, a number or a
    text), or ``NOT_GIVEN``."""
    given = NOT_GIVEN
    negated = "--no-" + flag[2:]
    for i, arg in enumerate(argv):
        if arg in (flag, negated) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            given = arg == flag  # a bool's flag pair
        elif arg == flag or arg.startswith(flag + "="):
            given = parse_flag_text(arg.partition("=")[2] if "=" in arg else argv[i + 1])
    return given


def parse_flag_text(text: str):
    """A flag's text as tyro reads the settings a recipe sets: None, a number, else the text."""
    if text == "None":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def code_entries(value) -> list:
    """A code setting's entries: nothing for None, a dict's values, a list's items, else the one value (a text, a
    callable, an interaction object)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, list | tuple) else [value]


def code_names(env: TokenEnvConfig) -> list[tuple[str, str]]:
    """``(what, "module:function")`` for each function or interaction that ``env`` names as text."""
    return [
        (what, spec)
        for name, what, _ in CODE_SETTINGS
        for spec in code_entries(getattr(env, name))
        if isinstance(spec, str)
    ]


def take_code_settings(saved: TokenEnvConfig, given: TokenEnvConfig, trust: bool, run_dir: Path) -> TokenEnvConfig:
    """``given`` with each code setting that config.json names and the command line does not: with ``trust``,
    config.json's, else refused (before anything is imported) with the flags that would name it again."""
    taken, unnamed = {}, []
    for name, what, flag in CODE_SETTINGS:
        value = getattr(saved, name)
        if not value or getattr(given, name):  # nothing named, or named again (then compared, as every setting)
            continue
        if trust:
            taken[name] = value
        else:
            unnamed += [(what, flag, spec) for spec in code_entries(value)]
    if unnamed:
        listing = ", ".join(f"{what} {spec!r}" for what, _, spec in unnamed)
        flags = " ".join(f"{flag} {spec}" for _, flag, spec in unnamed)
        raise RefusedCodeError(
            f"--resume: {Path(run_dir) / CONFIG_FILE} names code that resuming would import (and so run): {listing}. "
            f"A resumed run imports only the code you name again: add {flags} to the command if you trust it, or "
            "--trust-run-config to take every name from config.json"
        )
    return replace(given, **taken)


def check_recordable(env: TokenEnvConfig) -> None:
    """Refuse, at start, a function or interaction that config.json could only record by its memory address (a
    ``functools.partial`` of an object, a callable object): a resumed run could not name it again."""
    for name, what, _ in CODE_SETTINGS:
        value = getattr(env, name)
        if name != "reward_fns" or callable(value) or isinstance(value, str):
            items = [(None, value)]
        else:
            items = list(value.items()) if isinstance(value, dict) else [(None, fn) for fn in value or ()]
        for key, fn in items:
            text = None if fn is None or isinstance(fn, str) else unstable_description(fn)
            if text is not None:
                label = f"{what} {key!r}" if key is not None else what
                raise ValueError(
                    f"{label} would be recorded in config.json as {text!r}, which holds a memory address: a resumed "
                    "run could not name it again. Pass a module-level function (def f(prompt, response, **kwargs) in "
                    "a module; functools.partial of one with plain arguments works too), or its module:function text"
                )


def config_from_json(data: dict) -> TrainConfig:
    """The ``TrainConfig`` a ``config.json`` holds (complete it first: ``read_run_config``)."""
    run = {**data["run"], "run_dir": Path(data["run"]["run_dir"])}
    return TrainConfig(
        TokenEnvConfig(**data["env"]), PPOConfig(**data["ppo"]), KLConfig(**data["kl"]), RunConfig(**run)
    )
