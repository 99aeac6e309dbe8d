"""13 - What goes wrong: short real runs that break one thing each, and the metric that warns you.

Each panel is a short run of agents.train.train on the default task, the same seed
and size, with one setting changed from the healthy run ("baseline"):

    no KL penalty       kl_coef = 0, fixed: nothing holds the actor near the reference. The KL per response
                        runs away, and the text drifts into word strings the reward model still pays for.
    too large a step    learning rate x10 and 8 epochs: each update moves the policy far; approx_kl and the
                        clip fraction jump (compare 0.001-0.07 in healthy runs).
    a critic that       the default critic, a value head on the actor's own trunk, predicts the returns no
      cannot see        better than a constant, often worse (explained variance <= 0, down to -0.4 in the
                        truncated run below); a separate critic trunk initialised from the reward model
                        (share_backbone = False) is the fix shown beside it.
    no missing-EOS      short responses (max_new_tokens 10) scored even when cut off: the EOS rate falls, as
      penalty           the actor learns to keep praising until the limit; with a penalty of 1 it does not.

A last panel needs no training: the reward model's blind spots, hand-written texts
it scores wrongly (a mixed review scored positive, a string of adjectives scored
higher than a sentence).

Run:  python examples/13_what_goes_wrong.py [--out DIR] [--seed N] [--iterations N] [--quick]
Writes: DIR/13_runs/<name>/ (each run), DIR/13_what_goes_wrong.json, DIR/13_what_goes_wrong.png.
"""

import json
import shutil
from dataclasses import dataclass

import torch
from common import ExampleArgs, parse_args, save_figure, save_json, tokenizer
from matplotlib.figure import Figure
from transformers import AutoModelForSequenceClassification

from agents.train import TrainConfig, train
from textenv.default_task import REWARD_MODEL_DIR
from textenv.lm import sequence_scores


@dataclass
class Args(ExampleArgs):
    iterations: int = 24
    """PPO iterations of each run."""
    batch_size: int = 32
    """Episodes per iteration."""
    quick: bool = False
    """Two iterations of 8 episodes per run (for tests: checks the plumbing, shows nothing)."""


def settings(config: TrainConfig, name: str) -> None:
    """The one change each run makes to the healthy configuration."""
    if name == "no KL penalty":
        config.env.kl_coef, config.kl.adaptive_kl = 0.0, False
    elif name == "too large a step":
        config.ppo.learning_rate, config.ppo.epochs = 3e-3, 8
    elif name == "separate critic":
        config.run.share_backbone = False
    elif name.startswith("no EOS penalty"):
        config.env.max_new_tokens = 10
    elif name.startswith("EOS penalty"):
        config.env.max_new_tokens, config.env.missing_eos_penalty = 10, 1.0


RUNS = ["baseline", "no KL penalty", "too large a step", "no EOS penalty (10 tokens)", "EOS penalty 1 (10 tokens)",
        "separate critic"]  # fmt: skip


def run(name: str) -> tuple[list[dict], list[dict]]:
    """Train one run into OUT/13_runs/<name>; returns its metrics (one dict per iteration) and its last samples."""
    run_dir = args.out / "13_runs" / name.replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.seed = iterations, batch_size, args.seed
    config.run.eval_every, config.run.eval_episodes, config.run.checkpoint_every = 10**6, 8, 10**6
    config.run.run_dir, config.run.device, config.run.progress = run_dir, "cpu", False
    config.ppo.minibatch_size = config.ppo.micro_batch_size = min(16, batch_size)
    config.kl.kl_horizon = 160  # as in 12: beta visibly adapts in a short run
    settings(config, name)
    train(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if "env/score" in r], [s for s in samples if s["iteration"] == iterations - 1]


args = parse_args(Args, __doc__)
iterations, batch_size = (2, 8) if args.quick else (args.iterations, args.batch_size)
results = {}
for name in RUNS:
    print(f"run: {name} ({iterations} iterations of {batch_size} episodes)")
    metrics, samples = run(name)
    results[name] = {"metrics": metrics, "last_samples": samples}
    last = metrics[-1]
    print(f"  last iteration: score {last['env/score']:+.2f}, KL {last['env/kl']:.2f}, approx_kl "
          f"{last['ppo/approx_kl']:.3f}, clipfrac {last['ppo/clipfrac']:.2f}, explained variance "
          f"{last.get('ppo/explained_variance', float('nan')):+.2f}, EOS rate {last['env/eos_rate']:.0%}")  # fmt: skip
    for sample in samples[:2]:
        print(f"    {sample['score']:+.2f}  {sample['prompt']!r} -> {sample['response']!r}")

# The reward model's blind spots: texts a reader would not call good reviews (written by hand).
tok = tokenizer()
reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR, num_labels=1).eval()
probes = [
    ("a plain positive review", "The movie was great. Highly recommended."),
    ("a plain negative review", "The movie was awful. A total waste of time."),
    ("mixed: bad overall, one good word", "The movie was awful and boring, although the soundtrack was great."),
    ("mixed: negated praise", "The movie was not great. Not recommended."),
    ("word salad of praise", "great great brilliant superb superb excellent"),
    ("ungrammatical, short", "movie great was the."),
]
with torch.no_grad():
    encoded = tok([text for _, text in probes], return_tensors="pt", padding=True)
    probe_scores = sequence_scores(reward_model, encoded["input_ids"], encoded["attention_mask"]).tolist()
for (what, text), score in zip(probes, probe_scores):
    print(f"  RM {score:+.2f}  {what:36s} {text!r}")
save_json(
    args.out,
    "13_what_goes_wrong.json",
    {"iterations": iterations, "batch_size": batch_size, "runs": results,
     "probes": [{"what": w, "text": t, "score": s} for (w, t), s in zip(probes, probe_scores)]},
)  # fmt: skip


def curve(ax, key: str, names: list[str], title: str, warn: str) -> None:
    for name in names:
        points = [(m["iteration"], m[key]) for m in results[name]["metrics"] if key in m]
        ax.plot(*zip(*points), marker=".", label=name, color="tab:grey" if name == "baseline" else None)
    ax.set_title(f"{title}\nwarns you: {warn}", fontsize=9)
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


fig = Figure(figsize=(20, 9))
axes = fig.subplots(2, 4)
curve(axes[0, 0], "env/kl", ["baseline", "no KL penalty"], "No KL penalty: KL per response (nats)", "env/kl grows")
curve(axes[0, 1], "env/score", ["baseline", "no KL penalty"], "No KL penalty: score", "a score that still rises")
curve(axes[0, 2], "ppo/approx_kl", ["baseline", "too large a step"], "Too large a step: approx_kl",
      "approx_kl > 0.1")  # fmt: skip
curve(axes[0, 3], "ppo/clipfrac", ["baseline", "too large a step"], "Too large a step: clip fraction",
      "clipfrac > 0.3")  # fmt: skip
curve(axes[1, 0], "ppo/explained_variance", ["baseline", "EOS penalty 1 (10 tokens)", "separate critic"],
      "Critic: explained variance (shared trunk: baseline, EOS run)", "ppo/explained_variance <= 0")  # fmt: skip
eos_runs = ["no EOS penalty (10 tokens)", "EOS penalty 1 (10 tokens)"]
curve(axes[1, 1], "env/eos_rate", eos_runs, "Truncated responses: EOS rate", "env/eos_rate falls")
curve(axes[1, 2], "env/response_length", eos_runs, "Truncated responses: length", "length at max_new_tokens")
ax = axes[1, 3]
ax.barh(range(len(probes)), probe_scores, color=["tab:blue" if s > 0 else "tab:red" for s in probe_scores], alpha=0.5)
for i, (what, text) in enumerate(probes):
    ax.text(-2.4, i, f"{what}: {text!r}", va="center", fontsize=6.5)
ax.set_xlim(-2.5, 2.5)
ax.set_yticks([])
ax.axvline(0, color="black", lw=0.8)
ax.invert_yaxis()
ax.set_xlabel("reward-model score")
ax.set_title("The reward model's blind spots (hand-written texts)\nwarns you: read samples, not only the score",
             fontsize=9)  # fmt: skip
fig.suptitle(f"What goes wrong: short runs of {iterations} iterations x {batch_size} episodes, one change each")
fig.tight_layout()
save_figure(fig, args.out, "13_what_goes_wrong.png")
