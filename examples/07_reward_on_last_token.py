"""07 - The reward model's score is paid on the last token.

The reward model reads the whole (prompt, response) and returns one number. The env
pays it once, as part of the reward of the episode's last step (EOS, or the 32nd
token); every other step gets only the KL term:

    r_t = -beta * kl_t + (score if t is the last step else 0)

The script recomputes the score with textenv.lm.sequence_scores on the full
sequence, and also scores every prefix of the response: what the reward model
would have said had the response stopped there. Only the last one is paid.

Run:  python examples/07_reward_on_last_token.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/07_reward_on_last_token.json, DIR/07_prefix_scores.png (one episode), DIR/07_reward_heatmap.png (batch).
"""

from dataclasses import dataclass

import numpy as np
import torch
from common import (
    ExampleArgs,
    make_env,
    parse_args,
    print_table,
    rollout,
    save_figure,
    save_json,
    token_heatmap,
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure
from transformers import AutoModelForSequenceClassification

from textenv.default_task import REWARD_MODEL_DIR
from textenv.lm import sequence_scores


@dataclass
class Args(ExampleArgs):
    episodes: int = 12
    """Episodes in the batch."""
    episode: int = 0
    """Which episode to tabulate."""


args = parse_args(Args, __doc__)
agent, tok = warm_agent(args.out), tokenizer()
env = make_env(args.episodes)
beta = env.kl_coef
batch = rollout(agent, env, args.seed)  # rewards, kl, mask: (B, T); scores (B,)
reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR, num_labels=1).eval()

width, steps_max = batch.prompt_ids.shape[1], batch.actions.shape[1]
ids, mask = batch.input_ids, batch.attention_mask  # (B, W + T): prompt, then response (masked after its end)
scores = sequence_scores(reward_model, ids, mask)  # (B,) read at the last real token
prefix_scores = torch.stack(
    [sequence_scores(reward_model, ids[:, : width + k + 1], mask[:, : width + k + 1]) for k in range(steps_max)], 1
)  # (B, T): the score of prompt + response[: t + 1]
last = batch.mask.sum(1) - 1  # (B,) index of each episode's last step
score_term = batch.rewards - (-beta * batch.kl)  # what is left of the reward after the KL term, (B, T)
print(f"max |env score - sequence_scores| = {float((batch.scores - scores).abs().max()):.1e}")
on_last = score_term[torch.arange(len(last)), last]
off_last = score_term[batch.mask & (torch.arange(steps_max) != last[:, None])]
print(f"score term on the last step - score: max |.| = {float((on_last - scores).abs().max()):.1e}")
print(f"score term on every other step:      max |.| = {float(off_last.abs().max()):.1e}")

row = args.episode
steps = int(last[row]) + 1
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {
        "t": t,
        "token": tokens[t],
        "kl": float(batch.kl[row, t]),
        "-beta*kl": float(-beta * batch.kl[row, t]),
        "score_term": float(score_term[row, t]),
        "reward": float(batch.rewards[row, t]),
        "rm_score_of_prefix": float(prefix_scores[row, t]),
    }
    for t in range(steps)
]
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "reward = -beta*kl + score_term; the score term is the RM score, on the last step only")
save_json(
    args.out,
    "07_reward_on_last_token.json",
    {"kl_coef": beta, "prompt": batch.prompts[row], "score": float(batch.scores[row]),
     "score_recomputed": float(scores[row]), "tokens": table},
)  # fmt: skip

x = np.arange(steps)
fig = Figure(figsize=(max(7, 0.6 * steps), 4.5))
ax = fig.subplots()
ax.plot(x, [r["rm_score_of_prefix"] for r in table], "o--", color="tab:purple",
        label="reward model's score of prompt + response[: t + 1] (not paid)")  # fmt: skip
ax.bar(x, [r["reward"] for r in table], color="tab:blue", alpha=0.7, label="reward r_t actually paid by the env")
ax.annotate(f"score {table[-1]['score_term']:+.2f}\npaid here", (x[-1], table[-1]["reward"]),
            xytext=(x[-1] - 2.5, table[-1]["reward"] * 0.6), arrowprops={"arrowstyle": "->"})  # fmt: skip
ax.axhline(0, color="grey", lw=0.8)
ax.set_xticks(x, tokens, rotation=60)
ax.set_xlabel("step t")
ax.set_ylabel("score / reward")
ax.set_title(f"The reward model is read once, at the last token\n{batch.prompts[row]!r} → {batch.responses[row]!r}")
ax.legend(fontsize=8, loc="lower left")
save_figure(fig, args.out, "07_prefix_scores.png")

labels = [token_strings(tok, batch.actions[b, : int(last[b]) + 1]) for b in range(len(last))]
fig = Figure(figsize=(0.75 * steps_max + 2, 0.4 * len(labels) + 1.5))
ax = fig.subplots()
image = token_heatmap(
    ax, batch.rewards, batch.mask, labels, "Reward r_t over the batch: the score lands on the last token"
)
fig.colorbar(image, ax=ax, label="r_t = -beta * kl_t (+ score on the last token)")
save_figure(fig, args.out, "07_reward_heatmap.png")
