"""13 - What goes wrong: short real runs that break one thing each, and the metric that warns you.

Each panel is a short run of agents.train.train on the default task, the same seed
and size, with one setting changed from the healthy run ("baseline"):

    no KL penalty       kl_coef = 0, fixed: nothing holds the actor near the reference. The KL per response
                        runs away, and the text drifts into word strings the reward model still pays for.
    too large a step    learning rate x10 and 8 epochs: each update moves the policy far; approx_kl and the
                        clip fraction jump far above a healthy run's (12), and the entropy falls as the
                        policy collapses onto a few short answers, while the score still rises.
    a starved critic    the value head alone on the actor's own trunk, on its last hidden state, with the
                        plain value loss at weight 0.1 and a value clip of 0.2 (this library's defaults until
                        the critic was fixed): the value loss gets almost none of the trunk's gradient and the
                        head predicts the returns no better than a constant (explained variance about 0).
                        The baseline's critic (the middle block, the value loss over Var(returns), weight 2,
                        clip 1, and the reward model's score of each prefix as its prior) explains the
                        returns from the first update; a separate critic trunk initialised from the reward
                        model (share_backbone = False) learns them in a few.
    no missing-EOS      short responses (max_new_tokens 10) scored even when cut off: the EOS rate falls, as
      penalty           the actor learns to keep praising until the limit; with a penalty of 1 it does not.

A last panel needs no training: the reward model's blind spots, hand-written texts
it scores wrongly (a mixed review scored positive, a string of adjectives scored
higher than a sentence).

Run:  python examples/13_what_goes_wrong.py [--out DIR] [--seed N] [--iterations N] [--quick]
Writes: DIR/13_runs/<name>/ (each run), DIR/13_what_goes_wrong.json (each run's metrics, their summary: first,
        last, min, max, and the last samples), DIR/13_what_goes_wrong.png (one colour per run in every panel).
"""

import json
import shutil
from dataclasses import dataclass

import torch
from common import ExampleArgs, metric_summary, parse_args, save_figure, save_json, tokenizer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from transformers import AutoConfig, AutoModelForSequenceClassification

from agents.train import TrainConfig, train
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
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
    elif name == "starved critic":  # the settings the shared critic had before (docs/design.md)
        config.run.value_layer = AutoConfig.from_pretrained(POLICY_DIR).num_hidden_layers  # its last hidden state
        config.ppo.normalize_value_loss, config.ppo.vf_coef, config.ppo.clip_range_value = False, 0.1, 0.2
        config.run.value_prior = "none"  # the head alone, as it was
    elif name.startswith("no EOS penalty"):
        config.env.max_new_tokens = 10
    elif name.startswith("EOS penalty"):
        config.env.max_new_tokens, config.env.missing_eos_penalty = 10, 1.0


RUNS = ["baseline", "no KL penalty", "too large a step", "no EOS penalty (10 tokens)", "EOS penalty 1 (10 tokens)",
        "starved critic", "separate critic"]  # fmt: skip


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
    results[name] = {"metrics": metrics, "summary": metric_summary(metrics), "last_samples": samples}
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


# One colour per run, the same in every panel.
COLORS = {"baseline": "black", "no KL penalty": "tab:red", "too large a step": "tab:orange",
          "no EOS penalty (10 tokens)": "tab:purple", "EOS penalty 1 (10 tokens)": "tab:blue",
          "starved critic": "tab:brown", "separate critic": "tab:green"}  # fmt: skip


def curve(ax, key: str, names: list[str], title: str, ylabel: str, warn: str, log: bool = False) -> None:
    for name in names:
        points = [(m["iteration"], m[key]) for m in results[name]["metrics"] if key in m]
        ax.plot(*zip(*points), marker=".", ms=4, lw=1.2, color=COLORS[name], alpha=0.6 if name == "baseline" else 1)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{title}\nwarns you: {warn}", fontsize=9)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


fig = Figure(figsize=(14, 12.5))
axes = fig.subplots(3, 3)
step_runs = ["baseline", "no KL penalty", "too large a step"]
curve(axes[0, 0], "env/kl", step_runs, "KL to the reference per response", "KL (nats per response)",
      "env/kl grows")  # fmt: skip
curve(axes[0, 1], "env/score", step_runs, "Reward-model score per response", "score (reward units)",
      "nothing: the score rises in all three")  # fmt: skip
curve(axes[0, 2], "policy/entropy", step_runs, "Entropy of the policy per token", "entropy (nats per token)",
      "entropy near 0: the policy collapsed")  # fmt: skip
curve(axes[1, 0], "ppo/approx_kl", ["baseline", "too large a step"], "approx_kl of each update (log scale)",
      "approx_kl (nats per token)", "approx_kl > 0.1 (dashed)", log=True)  # fmt: skip
axes[1, 0].axhline(0.1, color="grey", ls="--", lw=0.8)
curve(axes[1, 1], "ppo/clipfrac", ["baseline", "too large a step"], "Clip fraction of each update",
      "share of tokens clipped", "clipfrac > 0.3 (dashed)")  # fmt: skip
axes[1, 1].axhline(0.3, color="grey", ls="--", lw=0.8)
critic_runs = ["baseline", "starved critic", "separate critic"]
curve(axes[1, 2], "ppo/explained_variance", critic_runs, "The critic's explained variance of the returns",
      "explained variance (1: perfect)", "<= 0: the critic does not help")  # fmt: skip
axes[1, 2].axhline(0, color="grey", ls="--", lw=0.8)
eos_runs = ["no EOS penalty (10 tokens)", "EOS penalty 1 (10 tokens)"]
curve(axes[2, 0], "env/eos_rate", eos_runs, "Responses ended by EOS (cut at 10 tokens)", "share of responses",
      "env/eos_rate falls")  # fmt: skip
curve(axes[2, 1], "env/response_length", eos_runs, "Response length (cut at 10 tokens)", "tokens per response",
      "length at max_new_tokens (dashed)")  # fmt: skip
axes[2, 1].axhline(10, color="grey", ls="--", lw=0.8)
ax = axes[2, 2]
rows = [i + 0.25 for i in range(len(probes))]  # each probe: two lines of text, then its bar
ax.barh(rows, probe_scores, height=0.28, color="0.55")  # grey: colours in this figure name the runs
for i, ((what, text), score) in enumerate(zip(probes, probe_scores)):
    box = {"facecolor": "white", "edgecolor": "none", "pad": 0.3}
    ax.text(-2.9, i - 0.45, f"{what}: {score:+.2f}", va="top", fontsize=7.5, weight="bold", bbox=box)
    ax.text(-2.9, i - 0.18, repr(text) if len(text) < 52 else repr(text[:50] + "…"), va="top", fontsize=7, bbox=box)
ax.set_xlim(-3, 2.5)
ax.set_ylim(len(probes) - 0.45, -0.5)
ax.set_yticks([])
ax.axvline(0, color="black", lw=0.8)
ax.set_xlabel("reward-model score (reward units)")
ax.set_title("The reward model's blind spots (hand-written texts)\nwarns you: read samples, not only the score",
             fontsize=9)  # fmt: skip
handles = [Line2D([], [], color=color, marker=".", label=name) for name, color in COLORS.items()]
fig.legend(handles=handles, loc="upper center", ncol=6, fontsize=8.5, bbox_to_anchor=(0.5, 0.965))
fig.suptitle(f"What goes wrong: short runs of {iterations} iterations x {batch_size} episodes, one change each "
             "(one colour per run)")  # fmt: skip
fig.tight_layout(rect=(0, 0, 1, 0.95))
save_figure(fig, args.out, "13_what_goes_wrong.png")
