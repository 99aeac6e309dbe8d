"""05 - The KL penalty to the reference model, per token.

The reward pays the actor for the score, but charges it on every token for moving
away from the reference (the SFT model): kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t),
and the per-token reward gets -beta * kl_t. Summed over a response, kl_t estimates
KL(pi || pi_ref) of the whole response. It is a one-sample estimate: its expectation
over the actor's samples is the KL, which is >= 0, but a single token's kl_t is
negative whenever the sampled token is likelier under the reference, and so, now
and then, is a whole response's sum. The exact per-token KL,
sum_a pi(a|s_t) * (log pi(a|s_t) - log pi_ref(a|s_t)) over the whole vocabulary,
is never negative; the script computes it next to the sampled one.

Sign convention: kl_t = log_probs - ref_log_probs is the KL estimate; the reward
term is -beta * kl_t = beta * (ref_log_probs - log_probs) (DeepSpeed-Chat's
compute_rewards writes the same as -kl_ctl * (log_probs - ref_log_probs)).

The agent passes its log-probs to the env (``step(actions, logprobs=...)``); the env
computes log pi_ref with its cached reference model. This script recomputes
log pi_ref independently, with one plain forward of the reference model over the
whole sequence, and the KL reward with textenv.rewards.non_score_reward.

Run:  python examples/05_kl_penalty.py [--out DIR] [--seed N] [--episodes N]
Writes: DIR/05_kl_penalty.json, DIR/05_kl_per_token.png (one episode), DIR/05_kl_heatmap.png (the batch),
        DIR/05_kl_per_response.png (each response's summed KL: sampled estimate and exact).
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
from transformers import AutoModelForCausalLM

from textenv.default_task import POLICY_DIR
from textenv.lm import position_ids_from_mask, token_logprobs
from textenv.rewards import non_score_reward


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
batch = rollout(agent, env, args.seed)  # logprobs, kl, rewards: (B, T); mask (B, T)

# log pi_ref, recomputed from scratch: one forward of the reference over prompt + response
reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
ids, mask = batch.input_ids, batch.attention_mask  # (B, W + T)
with torch.no_grad():
    logits = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
width = batch.prompt_ids.shape[1]
ref_logprobs = token_logprobs(logits[:, width - 1 : -1], batch.actions)  # (B, T): position p predicts token p + 1
# The exact KL of each step's next-token distributions, over the whole vocabulary (needs the actor's logits too).
with torch.no_grad():
    actor_logits = agent(ids, mask, position_ids_from_mask(mask)).logits
log_p = torch.log_softmax(actor_logits[:, width - 1 : -1], -1)  # (B, T, V)
log_p_ref = torch.log_softmax(logits[:, width - 1 : -1], -1)  # (B, T, V)
exact_kl = (log_p.exp() * (log_p - log_p_ref)).sum(-1) * batch.mask  # (B, T), >= 0 on every step
env_ref_logprobs = batch.logprobs - batch.kl  # what the env used: kl = logprob - ref_logprob
kl_reward, kl = non_score_reward(ref_logprobs, batch.logprobs, beta)  # -beta * kl, kl; (B, T) each
valid = batch.mask
print(f"beta = {beta}; {args.episodes} episodes, {int(valid.sum())} tokens")
print(f"max |env's log pi_ref - recomputed| = {float((env_ref_logprobs - ref_logprobs)[valid].abs().max()):.1e}")
print(f"max |env's kl - recomputed|         = {float((batch.kl - kl)[valid].abs().max()):.1e}")
sequence_kl = (batch.kl * valid).sum(1)  # (B,) per-response KL estimate
exact_sequence_kl = exact_kl.sum(1)  # (B,)
negative = int((sequence_kl < 0).sum())
print(f"per-response KL: mean {float(sequence_kl.mean()):+.3f} nats (exact: {float(exact_sequence_kl.mean()):+.3f}); "
      f"per-token kl < 0 on {float((batch.kl[valid] < 0).float().mean()):.0%} of tokens")  # fmt: skip
print(f"summed over a response, the sampled estimate is negative for {negative} of {args.episodes} responses; "
      f"the exact sum is negative for {int((exact_sequence_kl < -1e-6).sum())}")  # fmt: skip

row = args.episode
steps = int(valid[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
last = steps - 1
table = [
    {
        "t": t,
        "token": tokens[t],
        "action": int(batch.actions[row, t]),
        "log_pi": float(batch.logprobs[row, t]),
        "log_pi_ref": float(env_ref_logprobs[row, t]),
        "log_pi_ref_recomputed": float(ref_logprobs[row, t]),
        "kl": float(batch.kl[row, t]),
        "exact_kl": float(exact_kl[row, t]),
        "-beta*kl": float(kl_reward[row, t]),
        "reward": float(batch.rewards[row, t]),
    }
    for t in range(steps)
]
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "per token: kl = log_pi - log_pi_ref, reward = -beta * kl (+ the score on the last token)")
print(f"score on the last token: {float(batch.scores[row]):+.3f} = reward {table[last]['reward']:+.3f} "
      f"- ({table[last]['-beta*kl']:+.3f})")  # fmt: skip
save_json(
    args.out,
    "05_kl_penalty.json",
    {"kl_coef": beta, "prompt": batch.prompts[row], "score": float(batch.scores[row]), "tokens": table,
     "batch_sequence_kl": sequence_kl.tolist(), "batch_exact_sequence_kl": exact_sequence_kl.tolist(),
     "negative_sequences": negative, "episodes": args.episodes,
     "share_negative_tokens": float((batch.kl[valid] < 0).float().mean()),
     "mean_sequence_kl": float(sequence_kl.mean()), "mean_exact_sequence_kl": float(exact_sequence_kl.mean()),
     "all_kl": batch.kl[valid].tolist(), "all_exact_kl": exact_kl[valid].tolist()},
)  # fmt: skip

x = np.arange(steps)
fig = Figure(figsize=(max(7, 0.6 * steps), 6))
top, bottom = fig.subplots(2, 1, sharex=True)
top.bar(x - 0.2, [r["log_pi"] for r in table], 0.4, label="log pi(a_t|s_t), the actor")
top.bar(x + 0.2, [r["log_pi_ref"] for r in table], 0.4, label="log pi_ref(a_t|s_t), the reference")
top.set_ylabel("log-probability of a_t")
top.set_title(f"{batch.prompts[row]!r} → {batch.responses[row]!r}")
top.legend(fontsize=8)
colors = ["tab:red" if r["kl"] > 0 else "tab:green" for r in table]
bottom.bar(x, [r["kl"] for r in table], color=colors)
bottom.axhline(0, color="grey", lw=0.8)
bottom.set_ylabel("kl_t = log pi - log pi_ref")
bottom.set_title(f"Per-token KL (red: actor likes the token more than the reference; reward gets -{beta} * kl_t)")
bottom.set_xticks(x, tokens, rotation=60)
fig.tight_layout()
save_figure(fig, args.out, "05_kl_per_token.png")

labels = [token_strings(tok, batch.actions[b, : int(valid[b].sum())]) for b in range(len(valid))]
fig = Figure(figsize=(0.75 * batch.actions.shape[1] + 2, 0.4 * len(labels) + 1.5))
ax = fig.subplots()
title = "Per-token KL over the batch: where the actor left the reference (red: kl_t > 0)"
image = token_heatmap(ax, batch.kl, valid, labels, title, cmap="RdBu_r")
fig.colorbar(image, ax=ax, label="kl_t = log pi - log pi_ref (nats)")
save_figure(fig, args.out, "05_kl_heatmap.png")

fig = Figure(figsize=(9, 4))
ax = fig.subplots()
x = np.arange(len(sequence_kl))
ax.bar(x - 0.2, sequence_kl.numpy(), 0.4, color=np.where(sequence_kl.numpy() < 0, "tab:red", "tab:blue"),
       label="sampled estimate: sum_t (log pi - log pi_ref) (red: < 0)")  # fmt: skip
ax.bar(x + 0.2, exact_sequence_kl.numpy(), 0.4, color="tab:grey",
       label="exact: sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) over the vocabulary")  # fmt: skip
ax.axhline(0, color="black", lw=0.8)
ax.set_xlabel("response")
ax.set_ylabel("KL summed over the response (nats)")
ax.set_title(f"The KL is >= 0 only on average: {negative} of {len(x)} sampled sums are negative")
ax.legend(fontsize=8)
save_figure(fig, args.out, "05_kl_per_response.png")
