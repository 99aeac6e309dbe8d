"""Seconds per PPO iteration of textenv's trainer, against Hugging Face TRL's PPO trainer on the same models.

One iteration = one rollout of B episodes and the update on it (epochs x minibatches of
Adam steps), with the loop's own logging. Two shapes:

- ``default``: the embedded default task (tiny GPT-2 policy and reward model, 64 episodes,
  at most 32 new tokens, 4 epochs x 4 minibatches);
- ``gpt2-small``: a GPT-2-small-shaped policy and reward model (12 layers, width 768,
  vocabulary 50,257), random init, saved to a temp directory with a word-level tokenizer of
  50,257 entries built offline (PAD != EOS); 16 episodes, at most 32 new tokens, 4 x 4.
  Random models almost never sample EOS (about 1 in 50,257 per token), so on both sides
  (textenv stops at EOS, TRL runs with ``--stop-eos``) nearly every response is 32 tokens:
  equal work.

textenv runs ``agents.train.train`` itself (the ``python -m agents`` loop), with the
shared critic and with ``--no-share-backbone``, at each of ``--precisions`` (fp32 by
default; ``--precisions fp32 bf16`` adds 'textenv <critic> bf16' runs); phases are timed by wrapping the functions
the loop calls (rollout: policy forwards, reference forwards, reward model, sampling, env
bookkeeping; update: re-score, forwards, backwards, optimizer; logging). No evaluation
or checkpoint falls inside the timed iterations (``eval_every`` and ``checkpoint_every``
past the run: only iteration 0 evaluates, on one episode, untimed; the final checkpoint, evaluation
and save are skipped, as TRL's run has none).

With ``--trl-python`` each textenv run alternates with a run of
``../shared/peers/trl_ppo_bench.py`` (TRL 0.29.1's PPOTrainer: policy, reference, value
model from the reward model, reward model; ``--stop-eos``, temperature 1, same
learning rate, KL coefficient and shape) in that Python, in each precision: ``trl bf16``
runs it with ``--bf16`` and ``ACCELERATE_MIXED_PRECISION=bf16`` (what ``accelerate launch
--mixed_precision bf16`` sets). Every run is its own subprocess, whose peak RSS is read
from /proc (``peak_rss_mb``). Per run the figure is the median of updates 2..N; the ratio
is textenv's over TRL's, from runs of the same round and precision (< 1: textenv faster).

    python benchmarks/ppo_iteration.py --trl-python ../trl-venv/bin/python
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from trl_snapshots import HARNESS, harness_flags  # noqa: E402

Shape = Literal["default", "gpt2-small"]
Critic = Literal["shared", "separate"]
Precision = Literal["fp32", "bf16"]
ROLLOUT_PHASES = ("policy", "reference", "reward model", "sampling", "env", "rollout other")
UPDATE_PHASES = ("re-score", "forwards", "backwards", "optimizer", "update other")
PHASES = ROLLOUT_PHASES + UPDATE_PHASES + ("logging", "loop other")


@dataclass
class BenchmarkArgs:
    """What to measure, and how often."""

    shapes: list[Shape] = field(default_factory=lambda: ["default", "gpt2-small"])
    """Model shapes to measure."""
    critics: list[Critic] = field(default_factory=lambda: ["shared", "separate"])
    """textenv's critic: a value head on the policy's trunk, or its own trunk (--no-share-backbone)."""
    precisions: list[Precision] = field(default_factory=lambda: ["fp32"])
    """textenv's --precision in each run ('textenv <critic> bf16' in the tables; bf16 needs a CPU with AVX512-BF16
    or AMX, or a GPU with bf16). TRL runs in each of them too ('trl bf16': its --bf16 autocast); each textenv
    side's ratio is against the TRL run of its own precision."""
    trl_python: str | None = None
    """A Python with TRL 0.29.1 installed (../shared/peers/requirements-trl.txt); without it, textenv only."""
    updates: int = 15
    """PPO iterations per run on the default shape (the median is over updates 2..N)."""
    gpt2_updates: int = 3
    """PPO iterations per run on the gpt2-small shape."""
    rounds: int = 2
    """Rounds on the default shape; each runs every textenv critic and TRL once, alternating."""
    gpt2_rounds: int = 1
    """Rounds on the gpt2-small shape."""
    threads: int = 1
    """torch threads in every run."""
    seed: int = 0
    """Seed of both trainers."""
    other_checkout: str | None = None
    """Another checkout of textenv (e.g. before a change): each textenv run is repeated with its code, as
    'textenv <critic> @other', in the same rounds."""
    json: Path | None = None
    """Write every figure the tables print to this JSON file (per shape and side: s/update, peak RSS, the ratios
    to TRL, the phases), with the versions, settings and loads."""
    worker: str | None = None
    """(internal) run one textenv side in this process, as the JSON spec says, and print its JSON lines."""


# ---------------------------------------------------------------- shapes
@dataclass
class Task:
    policy: str
    reward: str
    prompts: str
    batch_size: int
    minibatch_size: int
    updates: int


def default_task(args: BenchmarkArgs) -> Task:
    from textenv.default_task import ARTIFACTS_DIR

    a = ARTIFACTS_DIR
    return Task(str(a / "policy"), str(a / "reward_model"), str(a / "prompts_train.txt"), 64, 16, args.updates)


def build_gpt2_small(directory: Path, seed: int) -> Task:
    """A GPT-2-small-shaped policy and reward model (random init) with a 50,257-entry word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

    from textenv.default_task import load_prompts

    prompts = load_prompts("train")
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    words = sorted({w for p in prompts for w in p.split()})
    vocab = specials + words + [f"<w{i}>" for i in range(50_257 - len(specials) - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[EOS]"
    )
    ids = dict(pad_token_id=0, eos_token_id=2, bos_token_id=2)
    config = dict(vocab_size=len(vocab), n_positions=1024, n_embd=768, n_layer=12, n_head=12, **ids)
    torch.manual_seed(seed)
    for name, model in (
        ("policy", GPT2LMHeadModel(GPT2Config(**config))),
        ("reward", GPT2ForSequenceClassification(GPT2Config(num_labels=1, **config))),
    ):
        model.save_pretrained(directory / name)
        hf_tokenizer.save_pretrained(directory / name)
    # both sides keep at most 16 prompt tokens; the prompts all fit (textenv would refuse a longer one)
    kept = [p for p in prompts if len(p.split()) <= 16]
    (directory / "prompts.txt").write_text("\n".join(kept) + "\n")
    return Task(str(directory / "policy"), str(directory / "reward"), str(directory / "prompts.txt"), 16, 4, 0)


# ---------------------------------------------------------------- the textenv side (a subprocess)
class PhaseClock:
    """Seconds per phase per iteration, from wrappers around the functions the training loop calls."""

    def __init__(self):
        self.starts: list[float] = []  # the start of each iteration's rollout; then the end of the last
        self.phases: list[dict[str, float]] = []
        self.active: list[str] = []  # nested phases: time goes to the innermost

    def add(self, phase: str, seconds: float) -> None:
        if self.phases:
            self.phases[-1][phase] += seconds

    def wrap(self, owner, name: str, phase: str, subtract_from: str | None = None):
        """Replace ``owner.name`` by a timed call charged to ``phase`` (and taken out of ``subtract_from``)."""
        original = getattr(owner, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                seconds = time.perf_counter() - start
                self.add(phase, seconds)
                if subtract_from is not None:
                    self.add(subtract_from, -seconds)

        setattr(owner, name, timed)


def train_config(spec: dict, run_dir: Path):
    """The ``TrainConfig`` of a textenv run of the benchmark (``textenv_spec``): the shape TRL runs too."""
    from agents.ppo import PPOConfig
    from agents.train import RunConfig, TrainConfig
    from textenv import TokenEnvConfig

    env = TokenEnvConfig(  # the default task: no models or prompts named, the task's own
        score_clip=5.0,
        reward_model=spec["reward"],
        prompts=spec["prompts"],
        prompt_truncation="left",
        max_new_tokens=32,
        kl_coef=0.05,
        **precision_setting(spec.get("precision", "fp32")),
    )
    ppo = PPOConfig(minibatch_size=spec["minibatch_size"], micro_batch_size=spec["minibatch_size"], learning_rate=3e-4)
    run = RunConfig(
        policy=spec["policy"],
        iterations=spec["updates"],
        batch_size=spec["batch_size"],
        share_backbone=spec["critic"] == "shared",
        seed=spec["seed"],
        run_dir=run_dir,
        checkpoint_every=10**6,
        eval_every=10**6,
        eval_episodes=1,  # iteration 0 evaluates (untimed): keep it short
        progress=False,
        threads=spec["threads"],
    )
    return TrainConfig(env=env, ppo=ppo, run=run)


def precision_setting(precision: str) -> dict[str, str]:
    """The env's precision setting; none for fp32 where the checkout predates it (--other-checkout: fp32 was all)."""
    from dataclasses import fields

    from textenv import TokenEnvConfig

    known = "precision" in {f.name for f in fields(TokenEnvConfig)}
    if not known and precision != "fp32":
        raise ValueError("this checkout of textenv has no precision setting: it runs fp32 only")
    return {"precision": precision} if known else {}


def run_textenv(spec: dict) -> None:
    """Train ``spec["updates"]`` iterations with ``agents.train.train``, printing one JSON line per iteration."""
    import torch

    import agents.ppo
    import agents.rollout
    import agents.train
    import textenv.lm
    from agents.policy import ActorCritic

    clock = PhaseClock()
    original_collect = agents.train.collect_rollout

    def collect(*a, **kw):  # an iteration starts with its rollout
        clock.starts.append(time.perf_counter())
        clock.phases.append(defaultdict(float))
        start = time.perf_counter()
        try:
            return original_collect(*a, **kw)
        finally:
            clock.add("rollout", time.perf_counter() - start)

    agents.train.collect_rollout = collect
    clock.wrap(agents.train, "ppo_update", "update")
    clock.wrap(agents.ppo, "rescore", "re-score", subtract_from="forwards")  # its forwards are score_rollout's
    clock.wrap(agents.ppo, "score_rollout", "forwards")
    clock.wrap(torch.Tensor, "backward", "backwards")
    clock.wrap(torch.optim.Adam, "step", "optimizer")
    clock.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")
    clock.wrap(agents.train.Trainer, "log", "logging")
    clock.wrap(agents.rollout, "sample_tokens", "sampling")
    env_forward = {"policy": 0.0}

    original_forward = textenv.lm.CachedStepper._forward

    def stepper_forward(self, **inputs):
        start = time.perf_counter()
        try:
            return original_forward(self, **inputs)
        finally:
            seconds = time.perf_counter() - start
            if isinstance(self, AgentStepper) or isinstance(self.model, ActorCritic):  # the rollout's own sampling
                clock.add("policy", seconds)
            else:
                clock.add("reward model" if self.scores else "reference", seconds)
                env_forward["policy"] += seconds

    textenv.lm.CachedStepper._forward = stepper_forward

    class AgentStepper(textenv.lm.CachedStepper):
        """The stepper the rollout samples with (it steps the agent's policy, a plain causal LM like the env's)."""

    agents.rollout.CachedStepper = AgentStepper
    original_scores = textenv.lm.sequence_scores

    def scores(*a, **kw):
        start = time.perf_counter()
        try:
            return original_scores(*a, **kw)
        finally:
            clock.add("reward model", time.perf_counter() - start)
            env_forward["policy"] += time.perf_counter() - start

    import textenv.scorers

    textenv.scorers.sequence_scores = scores  # where the env's reward model is called

    def save_checkpoint(self, iteration):  # the end of the last timed iteration; not run (TRL saves nothing)
        clock.starts.append(time.perf_counter())
        clock.phases.append(defaultdict(float))

    agents.train.Trainer.save_checkpoint = save_checkpoint

    def finish(self, iteration):  # untimed, and not what is compared: TRL saves nothing and evaluates nothing
        self.logger.close()
        return self.run_dir

    agents.train.Trainer.finish = finish
    # env.step and env.reset: time inside the env, less the frozen models' forwards inside it
    original_make = agents.train.make_rollout_env

    def make_env(*a, **kw):
        env = original_make(*a, **kw)
        for name in ("step", "reset"):
            method = getattr(env, name)

            def timed(*args, _method=method, **kwargs):
                env_forward["policy"] = 0.0
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    clock.add("env", time.perf_counter() - start - env_forward["policy"])

            setattr(env, name, timed)
        return env

    agents.train.make_rollout_env = make_env

    run_dir = Path(tempfile.mkdtemp(prefix="ppo_iteration_")) / "run"
    try:
        agents.train.train(train_config(spec, run_dir))
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    for i, phases in enumerate(clock.phases[:-1]):
        seconds = clock.starts[i + 1] - clock.starts[i]
        inside = sum(phases[p] for p in ROLLOUT_PHASES[:-1])
        phases["rollout other"] = phases.pop("rollout") - inside
        phases["update other"] = phases.pop("update") - sum(phases[p] for p in UPDATE_PHASES[:-1])
        phases["loop other"] = seconds - sum(phases[p] for p in PHASES[:-1])
        metrics = rows[i]
        print(
            json.dumps(
                {
                    "update": i + 1,
                    "s": seconds,
                    "phases": dict(phases),
                    "score": metrics.get("env/score"),
                    "kl": metrics.get("env/kl"),
                    "positive_rate": metrics.get("env/positive_rate"),
                    "response_length": float(metrics.get("env/response_length", float("nan"))),
                }
            ),
            flush=True,
        )


# ---------------------------------------------------------------- runs
@dataclass
class Result:
    side: str
    s_per_update: float
    max_rss_mb: float
    phases: dict[str, float]
    rows: list[dict]


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (``VmHWM`` of /proc/PID/status), in MB; None once it is gone.

    Not ``ru_maxrss`` of ``os.wait4``: Linux carries the forking process's peak into its child's across the
    exec, so every child of this script (which holds models) would read at least this script's own peak."""
    try:
        with open(f"/proc/{pid}/status") as status:
            kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(kb) / 1024


def run_process(command: list[str], side: str, checkout: Path = REPO, extra_env: dict | None = None) -> Result:
    """Run ``command``, read its JSON lines and its peak RSS (``peak_rss_mb``, read every 50 ms until it ends)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")])  # whose textenv runs
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env | (extra_env or {}), cwd=checkout)
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, peak_rss_mb(process.pid) or 0.0)
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"{side} failed ({process.returncode}):\n{err.read()[-4000:]}")
        lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
    rows = [row for row in lines if "update" in row]
    timed = rows[1:] if len(rows) > 1 else rows
    phases = {}
    if rows and "phases" in rows[0]:
        phases = {p: statistics.median(r["phases"].get(p, 0.0) for r in timed) for p in PHASES}
    seconds = statistics.median(r["s"] for r in timed)
    return Result(side, seconds, peak, phases, rows)


def side_name(base: str, precision: str) -> str:
    """A run's name in the tables: 'textenv shared', 'trl', ..., with ' bf16' after it in bf16."""
    return base if precision == "fp32" else f"{base} {precision}"


def side_precision(side: str) -> str:
    """The precision of the run named ``side`` (``side_name``'s)."""
    return "bf16" if " bf16" in side else "fp32"


def textenv_command(task: Task, side: str, args: BenchmarkArgs) -> list[str]:
    """The command of a textenv side, 'textenv <critic>[ bf16][ @other]'."""
    spec = textenv_spec(task, side.split()[1], args) | {"precision": side_precision(side)}
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]


def textenv_spec(task: Task, critic: str, args: BenchmarkArgs) -> dict:
    """What a textenv run is given (JSON, for the worker process); ``train_config`` makes its config."""
    embedded = task.policy == default_task(args).policy  # textenv runs the default task as `python -m agents` does
    return dict(
        policy=None if embedded else task.policy,
        reward=None if embedded else task.reward,
        prompts=None if embedded else task.prompts,
        batch_size=task.batch_size,
        minibatch_size=task.minibatch_size,
        updates=task.updates,
        critic=critic,
        seed=args.seed,
        threads=args.threads,
    )


def trl_command(task: Task, side: str, args: BenchmarkArgs) -> list[str]:
    """The command of a TRL side, 'trl' (fp32) or 'trl bf16'."""
    shape = dict(updates=task.updates, batch_size=task.batch_size, minibatch_size=task.minibatch_size)
    return [
        args.trl_python,
        str(HARNESS),
        *harness_flags(task.policy, task.reward, task.prompts, **shape, threads=args.threads, seed=args.seed),
        *(["--bf16"] if side_precision(side) == "bf16" else []),
    ]


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(shape: Shape, task: Task, rounds: int, args: BenchmarkArgs) -> dict[str, list[Result]]:
    results: dict[str, list[Result]] = defaultdict(list)
    for r in range(rounds):
        order = [side_name(f"textenv {c}", p) for c in args.critics for p in args.precisions]
        if args.other_checkout:
            order = [side for name in order for side in (name, f"{name} @other")]
        if args.trl_python:  # TRL amid textenv's runs, in each precision
            trl = [side_name("trl", p) for p in args.precisions]
            order[len(order) // 2 : len(order) // 2] = trl
        for side in order:
            before = load()
            command = trl_command(task, side, args) if side.startswith("trl") else textenv_command(task, side, args)
            checkout = Path(args.other_checkout).resolve() if side.endswith("@other") else REPO
            # TRL's PPOTrainer makes its Accelerator without a precision: bf16 reaches it as it does from
            # `accelerate launch --mixed_precision bf16`, by the environment (its --bf16 flag alone changes nothing)
            trl_bf16 = side.startswith("trl") and side_precision(side) == "bf16"
            bf16 = {"ACCELERATE_MIXED_PRECISION": "bf16"} if trl_bf16 else {}
            result = run_process(command, side, checkout, bf16)
            results[side].append(result)
            print(
                f"  [{shape} round {r + 1}] {side:23} {result.s_per_update:7.3f} s/update  "
                f"peak RSS {result.max_rss_mb:7.0f} MB  ({before} before, {load()} after)",
                flush=True,
            )
    return results


def peer_of(side: str) -> str:
    """The TRL side a side is compared with: the one of its precision."""
    return side_name("trl", side_precision(side))


def figures(task: Task, results: dict[str, list[Result]]) -> dict[str, dict]:
    """Per side: median s/update, peak RSS, the ratios to the TRL run of the same round and precision, the last
    update's score, KL and response length, and the phases (textenv)."""
    table = {}
    for side, runs in results.items():
        peer = results.get(peer_of(side))
        last = runs[-1].rows[-1]
        length = last.get("response_length")
        if length is None and last.get("gen_tokens"):  # TRL: decoded positions, EOS padding included
            length = last["gen_tokens"] / task.batch_size
        row = {"s_per_update": statistics.median(r.s_per_update for r in runs)}
        row["peak_rss_mb"] = max(r.max_rss_mb for r in runs)
        if peer and not side.startswith("trl"):  # per round, textenv over the TRL run of the same round
            row["x_trl_time"] = statistics.median(a.s_per_update / b.s_per_update for a, b in zip(runs, peer))
            row["x_trl_rss"] = row["peak_rss_mb"] / max(r.max_rss_mb for r in peer)
        row |= {"score_last": last.get("score"), "kl_last": last.get("kl"), "response_length_last": length}
        if runs[0].phases:
            row["phases"] = {p: statistics.median(r.phases[p] for r in runs) for p in PHASES}
        table[side] = row
    return table


def report(shape: Shape, task: Task, table: dict[str, dict]) -> None:
    print(
        f"\n{shape}: {task.batch_size} episodes x at most 32 new tokens, 4 epochs x "
        f"{task.batch_size // task.minibatch_size} minibatches, {task.updates} updates per run, "
        "median of updates 2..N per run, then the median over rounds; x TRL against TRL in the same precision"
    )
    print(
        f"{'side':24}{'s/update':>10}{'x TRL':>8}{'peak RSS MB':>13}{'x TRL':>8}"
        f"{'score last':>12}{'KL last':>9}{'resp len':>10}"
    )
    nan = float("nan")
    for side, row in table.items():
        ratio = f"{row['x_trl_time']:.2f}" if "x_trl_time" in row else ""
        rss_ratio = f"{row['x_trl_rss']:.2f}" if "x_trl_rss" in row else ""
        print(
            f"{side:24}{row['s_per_update']:10.3f}{ratio:>8}{row['peak_rss_mb']:13.0f}{rss_ratio:>8}"
            f"{row['score_last'] or nan:12.3f}{row['kl_last'] or nan:9.3f}{row['response_length_last'] or nan:10.1f}"
        )
    for side, row in table.items():
        if "phases" not in row:
            continue
        phases = row["phases"]
        rollout = sum(phases[p] for p in ROLLOUT_PHASES)
        update = sum(phases[p] for p in UPDATE_PHASES)
        print(
            f"  {side} phases (s, median per iteration): rollout {rollout:.3f} = "
            + ", ".join(f"{p} {phases[p]:.3f}" for p in ROLLOUT_PHASES)
            + f"; update {update:.3f} = "
            + ", ".join(f"{p} {phases[p]:.3f}" for p in UPDATE_PHASES)
            + f"; logging {phases['logging']:.3f}; loop other {phases['loop other']:.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(BenchmarkArgs, args=argv, description=__doc__)
    if args.worker is not None:
        run_textenv(json.loads(args.worker))
        return
    import torch
    import transformers

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s) per run; {load()} at the start"
    )
    if args.trl_python:
        print(
            f"peer: {HARNESS.name} in {args.trl_python} (TRL 0.29.1 PPOTrainer, four models, --stop-eos, "
            f"{' and '.join(args.precisions)}, temperature 1, lr 3e-4, KL 0.05); ratios are textenv / TRL from the "
            "same round and precision"
        )
    else:
        print("no --trl-python: textenv only")
    if args.other_checkout:
        print(f"@other: textenv's code from {Path(args.other_checkout).resolve()}, same script and settings")
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker", "trl_python", "other_checkout")}
    command = " ".join(argv or sys.argv[1:]).replace(args.trl_python or "\0", "TRL_PYTHON")  # no machine's paths
    command = command.replace(args.other_checkout or "\0", "OTHER_CHECKOUT")
    written: dict = {"command": "python benchmarks/ppo_iteration.py " + command}
    written |= {"torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count()}
    written |= {
        "settings": settings,
        "load_at_start": load(),
        "peer": "TRL 0.29.1 PPOTrainer" if args.trl_python else None,
    }
    written["shapes"] = {}
    with tempfile.TemporaryDirectory(prefix="ppo_iteration_models_") as tmp:
        for shape in args.shapes:
            if shape == "default":
                task, rounds = default_task(args), args.rounds
            else:
                task, rounds = build_gpt2_small(Path(tmp), args.seed), args.gpt2_rounds
                task.updates = args.gpt2_updates
            print(f"\n{shape}: measuring ({load()})", flush=True)
            table = figures(task, measure(shape, task, rounds, args))
            report(shape, task, table)
            written["shapes"][shape] = {"episodes": task.batch_size, "updates": task.updates, "rounds": rounds}
            written["shapes"][shape]["sides"] = table
    print(f"\n{load()} at the end")
    if args.json is not None:
        written["load_at_end"] = load()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(written, indent=2) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
