"""Generated tokens per second of the TokenRLHF-v0 vector env, against plain ``model.generate``.

For each batch size N, on the embedded default task (offline), this script times:

(a) baseline: Hugging Face ``model.generate`` of the default-task policy on N
    prompts (pure sampling: do_sample=True, top_k=0, top_p=1.0, temperature 1);
(b) the vector env, ``gym.make_vec("TokenRLHF-v0", num_envs=N,
    vectorization_mode="vector_entry_point", autoreset_mode="Disabled")`` (built
    by ``agents.rollout.make_rollout_env``), driven in lockstep by the same policy
    with its own KV cache (``textenv.lm.CachedStepper``): the agent samples a
    token per slot and passes its log-prob to ``env.step(actions, logprobs=lp)``
    (the fast path: the env runs only its reference model, KV-cached, and scores
    finished responses with the reward model); one episode = reset + steps until
    every slot has ended. The time spent inside ``env.reset``/``env.step`` alone is
    reported too;
(c) an uncached env-like loop: the same agent, but the reference log-prob of each
    action comes from a full forward of the reference model over the whole
    growing context (no ``past_key_values``), and the reward model scores the
    finished responses; it shows what the env's KV cache saves.

By default every row generates exactly ``--max-new-tokens`` tokens: ``generate``
gets ``min_new_tokens=max_new_tokens`` and the agent masks EOS the same way (so
every env episode is truncated at ``max_new_tokens``). With ``--stop-at-eos``
sampling is the plain softmax, episodes end at EOS, and only tokens actually
generated are counted (up to and including EOS; env steps of live slots).

Every figure is the median of ``--repeats`` timed runs after one warm-up run;
methods are interleaved within each repeat. Ratios are time per generated token
divided by the baseline's (a), measured in the same process, so > 1 means slower.

    python benchmarks/env_throughput.py --num-envs 1 8 32 --max-new-tokens 32 --device cpu
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

import gymnasium as gym
import numpy as np
import torch
import transformers
import tyro
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from agents.rollout import make_rollout_env
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.lm import CachedStepper, pad_batch, position_ids_from_mask, sequence_scores, token_logprobs

KL_COEF = TokenEnvConfig().kl_coef  # the env's default, which the envs below run with


@dataclass
class BenchmarkArgs:
    """What to measure, and how often."""

    num_envs: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Batch sizes N to measure."""
    max_new_tokens: int = 32
    """Longest response (without --stop-at-eos, every row generates exactly this many tokens)."""
    max_prompt_tokens: int = 16
    """The env's max_prompt_tokens."""
    device: str = "cpu"
    """cpu, cuda, cuda:1, ..."""
    repeats: int = 5
    """Timed runs per measurement (median reported)."""
    uncached_max_n: int | None = None
    """Run (c), the uncached loop, only for N up to this (default: every N)."""
    stop_at_eos: Annotated[bool, tyro.conf.FlagCreatePairsOff] = False
    """Let rows end at EOS and count only generated tokens (default: EOS masked, full length)."""
    threads: int | None = None
    """torch.set_num_threads (default: torch's choice)."""
    seed: int = 0
    """Seed of the env's reset and of the sampling (repeat r samples with seed + 1 + r)."""

    def __post_init__(self):  # tyro reports a ValueError here as a command-line error
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda given but torch.cuda.is_available() is False")
        if not self.num_envs or min(self.num_envs) < 1 or self.max_new_tokens < 1 or self.repeats < 1:
            raise ValueError("--num-envs, --max-new-tokens and --repeats must be >= 1")


def parse_args(argv: list[str] | None = None) -> BenchmarkArgs:
    return tyro.cli(BenchmarkArgs, args=argv, description=__doc__)


class Clock:
    """Wall clock that waits for the device's queued work before every reading."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Run:
    seconds: float
    tokens: int
    env_seconds: float = float("nan")  # (b) only: time inside env.reset + env.step
    max_abs_kl: float = 0.0  # (b), (c): largest |policy log-prob - reference log-prob| seen (policy = reference)


class Agent:
    """The acting policy, stepped over N rows with one KV cache (``textenv.lm.CachedStepper``, as in ``sample``)."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int, mask_eos: bool):
        self.stepper = CachedStepper(model, pad_token_id)
        self.device = self.stepper.device
        self.eos = torch.tensor([eos_token_id], device=self.device)
        self.mask_eos = mask_eos
        self.logits: torch.Tensor | None = None

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Prefill left-padded prompts (the stepper drops all-pad leading columns first)."""
        self.logits = self.stepper.prefill(input_ids, attention_mask)

    def act(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A token per row, sampled from softmax(logits) (EOS masked if asked), and the policy's log-prob of it.

        The log-prob is that of the unmasked policy: the env's reference model is the same
        network, so the env's KL (info["kl"]) must come out 0, a check that the env and the
        agent agree on every context.
        """
        logits = self.logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.mask_eos:  # what generate's min_new_tokens does
            logits = logits.index_fill(-1, self.eos, float("-inf"))
        # softmax + multinomial as in generate: with the same seed both draw the same tokens
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]
        return token, logprobs.gather(-1, token[:, None])[:, 0]

    def advance(self, token: torch.Tensor) -> None:
        """Append ``token`` to every row (rows that have ended too, as generate does)."""
        self.logits = self.stepper.advance(token)


def generated_tokens(new_tokens: torch.Tensor, eos_token_id: int) -> int:
    """Tokens per row up to and including the first EOS (all of them when a row has none), summed."""
    is_eos = new_tokens == eos_token_id
    has_eos = is_eos.any(1)
    first_eos = is_eos.long().argmax(1)
    return int(torch.where(has_eos, first_eos + 1, new_tokens.shape[1]).sum())


def run_generate(policy, tokenizer, prompts, args: BenchmarkArgs, clock) -> Run:
    """(a) the baseline: HF generate, pure sampling, same model and prompts."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(policy.device)
    extra = {} if args.stop_at_eos else {"min_new_tokens": args.max_new_tokens}
    start = clock()
    out = policy.generate(
        **batch,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    seconds = clock() - start
    new = out[:, batch["input_ids"].shape[1] :]
    tokens = generated_tokens(new, tokenizer.eos_token_id)
    if not args.stop_at_eos and tokens != len(prompts) * args.max_new_tokens:
        raise RuntimeError(f"generate produced {tokens} tokens, expected {len(prompts) * args.max_new_tokens}")
    return Run(seconds, tokens)


def run_env(env, agent: Agent, indices: np.ndarray, args: BenchmarkArgs, clock) -> Run:
    """(b) one lockstep episode of the vector env, the agent passing logprobs= (the fast path)."""
    env_seconds = 0.0
    start = clock()
    observation, _ = env.reset(options={"prompt_index": indices})
    env_seconds += clock() - start
    agent.start(torch.as_tensor(observation["input_ids"]), torch.as_tensor(observation["attention_mask"]))
    done = np.zeros(len(indices), dtype=bool)
    tokens, max_abs_kl = 0, 0.0
    while True:
        token, logprob = agent.act()
        actions = token.cpu().numpy()
        t0 = clock()
        _, _, terminated, truncated, info = env.step(actions, logprobs=logprob)
        env_seconds += clock() - t0
        tokens += int((~done).sum())  # env steps of live slots
        max_abs_kl = max(max_abs_kl, float(np.nanmax(np.abs(info["kl"]))))
        done |= terminated | truncated
        if done.all():
            break
        agent.advance(token)
    seconds = clock() - start
    if not args.stop_at_eos and tokens != len(indices) * args.max_new_tokens:
        raise RuntimeError(f"the env ran {tokens} live steps, expected {len(indices) * args.max_new_tokens}")
    return Run(seconds, tokens, env_seconds, max_abs_kl)


def run_uncached(agent: Agent, reference, reward_model, prompt_ids, tokenizer, args: BenchmarkArgs, clock) -> Run:
    """(c) an env-like loop whose reference log-probs come from full forwards without a KV cache.

    Like the env it pays each step: the KL term for every live row, and the reward model's
    score for the rows that end on that step (EOS, or the last allowed token).
    """
    device = agent.device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    start = clock()
    ids, mask = (t.to(device) for t in pad_batch(prompt_ids, pad, side="left"))
    agent.start(ids, mask)
    live = torch.ones(len(prompt_ids), dtype=torch.bool, device=device)
    rewards, kls = [], []
    tokens = 0
    for step in range(args.max_new_tokens):
        token, logprob = agent.act()
        # the uncached "env": the reference model over the whole context, every step
        ref_logits = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        kl = torch.where(live, logprob - token_logprobs(ref_logits[:, -1], token), 0.0)  # (N,)
        reward = -KL_COEF * kl
        tokens += int(live.sum())
        ids = torch.cat([ids, torch.where(live, token, pad)[:, None]], dim=1)
        mask = torch.cat([mask, live.long()[:, None]], dim=1)
        ended = live & ((token == eos) | (step == args.max_new_tokens - 1))
        live = live & ~ended
        if ended.any():  # rows padded on both sides are fine: sequence_scores re-lays them
            rows = ended.nonzero()[:, 0]
            reward[rows] += sequence_scores(reward_model, ids[rows], mask[rows])
        rewards.append(reward)
        kls.append(kl.abs().max())
        if not live.any():
            break
        agent.advance(token)
    max_abs_kl = float(torch.stack(kls).max())
    seconds = clock() - start
    return Run(seconds, tokens, max_abs_kl=max_abs_kl)


def median_run(runs: list[Run]) -> Run:
    """Median time per token over repeats (and the matching env share), at the mean tokens per run."""
    tokens = round(statistics.mean(r.tokens for r in runs))
    per_token = statistics.median(r.seconds / r.tokens for r in runs)
    env_per_token = statistics.median(r.env_seconds / r.tokens for r in runs)
    return Run(per_token * tokens, tokens, env_per_token * tokens, max(r.max_abs_kl for r in runs))


class OtherLoad:
    """CPU time that other processes took during the benchmark (Linux): timings are only clean when it is ~0."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return busy, usage.ru_utime + usage.ru_stime, time.perf_counter()

    def cores(self) -> float | None:
        """Average number of cores busy with other processes since construction."""
        end = self._read()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return max(busy - own, 0.0) / wall


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


@dataclass
class Task:
    """The default task: its models on the benchmark's device (``policy`` also acts as the agent) and prompts."""

    tokenizer: transformers.PreTrainedTokenizerBase
    policy: torch.nn.Module
    reference: torch.nn.Module  # a second copy of the policy, for (c)
    reward_model: torch.nn.Module
    prompts: list[str]

    @classmethod
    def load(cls, device: torch.device) -> Task:
        tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
        policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR).to(device).eval()
        reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR).to(device).eval()
        reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR, num_labels=1)
        reward_model = reward_model.to(device).eval()
        reward_model.config.pad_token_id = tokenizer.pad_token_id
        return cls(tokenizer, policy, reference, reward_model, load_prompts("train"))


def configure(args: BenchmarkArgs) -> torch.device:
    """Threads and quiet libraries; print the software, the device and the mode. Returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, gymnasium {gym.__version__}, "
        f"python {platform.python_version()}"
    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"device: {device} ({device_name}); torch threads: {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}), os.cpu_count: {os.cpu_count()}"
    )
    mode = "EOS allowed, actual tokens counted" if args.stop_at_eos else "EOS masked, every row full length"
    print(f"max_new_tokens: {args.max_new_tokens}; {mode}; median of {args.repeats} runs after 1 warm-up")
    return device


def timed_runs(methods: dict, args: BenchmarkArgs) -> dict[str, list[Run]]:
    """One warm-up run of every method, then ``args.repeats`` timed rounds, the methods interleaved in each."""
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    with torch.inference_mode():
        torch.manual_seed(args.seed)
        for fn in methods.values():  # warm-up
            fn()
        for repeat in range(args.repeats):  # interleaved, so slow drifts hit every method alike
            for name, fn in methods.items():
                torch.manual_seed(args.seed + 1 + repeat)
                runs[name].append(fn())
    return runs


def measure(n: int, args: BenchmarkArgs, task: Task, agent: Agent, clock: Clock) -> dict[str, list[Run]]:
    """The runs of (a), (b) and, where asked, (c) at batch size ``n``."""
    indices = np.arange(n) % len(task.prompts)
    prompts = [task.prompts[i] for i in indices]
    prompt_ids = [task.tokenizer(p)["input_ids"] for p in prompts]
    device = torch.device(args.device)
    env = make_rollout_env(
        n, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, device=device
    )
    env.reset(seed=args.seed)
    methods = {
        "generate": partial(run_generate, task.policy, task.tokenizer, prompts, args, clock),
        "env": partial(run_env, env, agent, indices, args, clock),
    }
    if args.uncached_max_n is None or n <= args.uncached_max_n:
        methods["uncached"] = partial(
            run_uncached, agent, task.reference, task.reward_model, prompt_ids, task.tokenizer, args, clock
        )
    runs = timed_runs(methods, args)
    env.close()
    return runs


def print_checks(results: dict[tuple[int, str], Run], differing: list[int], other: OtherLoad) -> None:
    """The KL check, the token-count check and how busy the machine was."""
    kl = max(run.max_abs_kl for run in results.values())
    print(
        f"check: max |policy log-prob - reference log-prob| over every step of (b) and (c) = {kl:.1e} "
        f"(policy and reference are the same network, so ~0 means env and agent saw the same contexts)"
    )
    print(
        "check: every method generated the same number of tokens in each repeat (same seed)"
        + (f" -- except at N={differing}" if differing else "")
    )
    cores = other.cores()
    if cores is not None:
        print(f"other processes on this machine used {cores:.2f} cores on average during the measurements", end="")
        print(
            " -- WARNING: the machine was busy, timings may be off; rerun when idle (or with --threads 1)"
            if cores > 0.1
            else ""
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = configure(args)
    clock = Clock(device)
    task = Task.load(device)
    agent = Agent(task.policy, task.tokenizer.pad_token_id, task.tokenizer.eos_token_id, mask_eos=not args.stop_at_eos)
    print(
        f"models: default task, policy = env reference ({sum(p.numel() for p in task.policy.parameters()):,} params), "
        f"reward model ({sum(p.numel() for p in task.reward_model.parameters()):,} params)"
    )

    other = OtherLoad()
    results: dict[tuple[int, str], Run] = {}
    differing = []  # N where the methods did not generate the same token counts in every repeat
    for n in args.num_envs:
        runs = measure(n, args, task, agent, clock)
        for name, name_runs in runs.items():
            results[n, name] = median_run(name_runs)
        if len({tuple(run.tokens for run in name_runs) for name_runs in runs.values()}) > 1:
            differing.append(n)
        summary = ", ".join(f"{name} {results[n, name].tokens / results[n, name].seconds:,.0f} tok/s" for name in runs)
        print(f"  N={n}: {summary}", flush=True)

    print_table(args, results)
    print_checks(results, differing, other)


def print_table(args: BenchmarkArgs, results: dict[tuple[int, str], Run]) -> None:
    print()
    print(
        "baseline (a): HF model.generate, same model (default-task policy), same N prompts, same max_new_tokens, "
        "do_sample=True top_k=0 top_p=1.0" + ("" if args.stop_at_eos else " min_new_tokens=max_new_tokens")
    )
    print("x(a) = time per generated token / baseline (a)'s, same N, same process (> 1: slower than generate)")
    print("x(b) = time per generated token / the env loop (b)'s (> 1: slower than the KV-cached env)")
    header = f"{'N':>4}  {'method':<46} {'tokens':>7} {'median s':>9} {'tokens/s':>10} {'x(a)':>7} {'x(b)':>7}"
    print(header)
    print("-" * len(header))
    labels = {
        "generate": "(a) HF model.generate [baseline]",
        "env": "(b) vector env + KV-cached agent, logprobs=",
        "env_only": "    (b) part inside env.reset + env.step",
        "agent": "    (b) part in the agent (policy fwd + sample)",
        "uncached": "(c) env-like loop, uncached reference",
    }
    for n in args.num_envs:
        base, env = results[n, "generate"], results[n, "env"]
        base_pt, env_pt = base.seconds / base.tokens, env.seconds / env.tokens
        rows = [
            ("generate", base),
            ("env", env),
            ("env_only", Run(env.env_seconds, env.tokens)),
            ("agent", Run(env.seconds - env.env_seconds, env.tokens)),
        ]
        if (n, "uncached") in results:
            rows.append(("uncached", results[n, "uncached"]))
        for name, run in rows:
            per_token = run.seconds / run.tokens
            vs_env = f"{per_token / env_pt:7.2f}" if name in ("generate", "uncached") else ""
            print(
                f"{n:>4}  {labels[name]:<46} {run.tokens:>7} {run.seconds:>9.4f} {run.tokens / run.seconds:>10,.0f} "
                f"{per_token / base_pt:>7.2f} {vs_env:>7}"
            )
    print()
    print(
        "tokens: generated tokens per run (b: env steps of live slots); median s: median wall time of one run, "
        "prefill / reset included; tokens/s = tokens / median s."
    )


if __name__ == "__main__":
    main()
