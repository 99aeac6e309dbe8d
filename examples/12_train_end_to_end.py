"""12 - Everything together: train the policy with PPO, end to end.

agents.train.train runs the whole loop of the previous examples, once per
iteration: collect a lockstep batch of episodes (01, 02; rewards with the KL
penalty, 05, and the score on the last token, 07), score it with the actor and the
critic (06), compute GAE advantages (09) and run K epochs of clipped PPO on the
actor and critic losses (08, 10, 11), then adapt beta. The trained policy is a plain
Hugging Face model in RUN/final.

This script trains a small run, then samples the same held-out prompts with the
SFT policy (before) and the trained one (after). Its learning curve shows what to
watch in any run (docs/metrics.md): the score, the KL per response and the adaptive
beta that steers it, the critic's explained variance, PPO's approx_kl and clip
fraction, the value loss and the entropy. The KL controller's horizon is shorter here
than the library's default (--kl-horizon 160 against 1000) so that beta visibly
adapts within 20 short iterations.

Run:  python examples/12_train_end_to_end.py [--out DIR] [--seed N] [--iterations N] [--batch-size N]
Writes: DIR/12_run/ (the run: metrics, checkpoints, final/), DIR/12_train_end_to_end.json,
        DIR/12_learning_curve.png (the run's curves), DIR/12_scores_before_after.png.
"""

import json
import shutil
from dataclasses import dataclass

import numpy as np
from common import ExampleArgs, make_env, metric_summary, parse_args, rollout, save_figure, save_json, sft_agent
from matplotlib.figure import Figure

from agents.logger import summary
from agents.policy import ActorCritic
from agents.train import TrainConfig, train
from textenv.default_task import load_prompts


@dataclass
class Args(ExampleArgs):
    iterations: int = 20
    """PPO iterations."""
    batch_size: int = 32
    """Episodes per iteration."""
    eval_episodes: int = 64
    """Episodes of each evaluation, on the held-out prompts."""
    samples: int = 8
    """Before/after samples to print."""
    kl_horizon: int = 160
    """Horizon of the adaptive KL controller, in episodes (the library's default is 1000)."""


args = parse_args(Args, __doc__)
run_dir = args.out / "12_run"
shutil.rmtree(run_dir, ignore_errors=True)  # train() refuses to overwrite a run, so start afresh
config = TrainConfig()
config.run.iterations, config.run.batch_size, config.run.seed = args.iterations, args.batch_size, args.seed
config.run.eval_every, config.run.eval_episodes = max(1, args.iterations // 4), args.eval_episodes
config.run.run_dir, config.run.device, config.run.progress = run_dir, "cpu", False
config.ppo.minibatch_size = config.ppo.micro_batch_size = min(16, args.batch_size)
config.kl.kl_horizon = args.kl_horizon
print(f"training: {args.iterations} iterations of {args.batch_size} episodes -> {run_dir}")
final = train(config)
print(summary(run_dir))

# The same held-out prompts, the same seed: SFT policy before, trained policy after.
env = make_env(args.eval_episodes, prompts=load_prompts("eval"))
before = rollout(sft_agent(), env, args.seed + 123)
after = rollout(ActorCritic.from_pretrained(final).eval(), env, args.seed + 123)
assert before.prompts == after.prompts
samples = [
    {"prompt": p, "before": b, "before_score": float(sb), "after": a, "after_score": float(sa)}
    for p, b, sb, a, sa in zip(before.prompts, before.responses, before.scores, after.responses, after.scores)
]
for s in samples[: args.samples]:
    print(f"\n{s['prompt']!r}")
    print(f"  before ({s['before_score']:+.2f}): {s['before']}")
    print(f"  after  ({s['after_score']:+.2f}): {s['after']}")
results = {
    "positive_before": float((before.scores > 0).float().mean()),
    "positive_after": float((after.scores > 0).float().mean()),
    "score_before": float(before.scores.mean()),
    "score_after": float(after.scores.mean()),
    "kl_after": float(after.kl.sum(1).mean()),
}
print(f"\n{args.eval_episodes} held-out episodes: positive {results['positive_before']:.0%} -> "
      f"{results['positive_after']:.0%}, mean score {results['score_before']:+.2f} -> {results['score_after']:+.2f}, "
      f"KL to the reference after training {results['kl_after']:.2f} nats per response")  # fmt: skip
metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
save_json(
    args.out,
    "12_train_end_to_end.json",
    {**results, "kl_target": config.kl.kl_target, "kl_horizon": args.kl_horizon, "batch_size": args.batch_size,
     "summary": metric_summary(metrics), "samples": samples, "metrics": metrics},
)  # fmt: skip

# The learning curve: train rollouts as lines, evaluations on held-out prompts as points.
PANELS = [  # (train key, eval key, title, y label)
    ("env/score", "eval/score", "reward-model score per response", "score (reward units)"),
    ("env/kl", "eval/kl", f"KL to the reference per response\n(dashed: the target, {config.kl.kl_target})", "nats"),
    ("kl/coef", None, f"beta, the KL coefficient\n(adaptive, horizon {args.kl_horizon})", "beta"),
    ("ppo/explained_variance", None, "critic's explained variance\n(1 perfect, <= 0 useless)", "explained variance"),
    ("ppo/approx_kl", None, "approx_kl of the update\n(pi_old to pi, log scale)", "nats per token"),
    ("ppo/clipfrac", None, "clip fraction of the update", "share of tokens clipped"),
    ("loss/value", None, "value loss", "0.5 (V - return)^2"),
    ("policy/entropy", None, "entropy of the policy", "nats per token"),
]
fig = Figure(figsize=(14, 7.5))
for ax, (key, eval_key, title, ylabel) in zip(fig.subplots(2, 4, sharex=True).flat, PANELS):
    train_points = [(m["iteration"], m[key]) for m in metrics if key in m]
    ax.plot(*zip(*train_points), color="tab:blue", label="train rollouts")
    if eval_key:
        eval_points = [(m["iteration"], m[eval_key]) for m in metrics if eval_key in m]
        ax.plot(*zip(*eval_points), "o", color="tab:orange", label="eval, held-out prompts")
        ax.legend(fontsize=7)
    if key == "env/kl":
        ax.axhline(config.kl.kl_target, color="grey", ls="--", lw=0.8)
    if key == "ppo/explained_variance":
        ax.axhline(0, color="grey", ls="--", lw=0.8)
    if key == "ppo/approx_kl":
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
fig.suptitle(f"PPO on the default task: {args.iterations} iterations of {args.batch_size} episodes")
fig.tight_layout()
save_figure(fig, args.out, "12_learning_curve.png")
fig = Figure(figsize=(7, 4))
ax = fig.subplots()
bins = np.linspace(-3, 3, 31)
ax.hist(before.scores.numpy(), bins=bins, alpha=0.6, label=f"SFT policy (mean {results['score_before']:+.2f})")
ax.hist(after.scores.numpy(), bins=bins, alpha=0.6, label=f"after PPO (mean {results['score_after']:+.2f})")
ax.axvline(0, color="grey", lw=0.8)
ax.set_xlabel("reward-model score of the response (> 0: positive review)")
ax.set_ylabel("episodes")
ax.set_title(f"Scores on {args.eval_episodes} held-out prompts, before and after {args.iterations} PPO iterations")
ax.legend()
save_figure(fig, args.out, "12_scores_before_after.png")
