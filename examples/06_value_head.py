"""06 - The critic is a value head: one linear layer on a transformer's hidden state.

The critic predicts V(s_t), the return the actor will get from state s_t on. In
agents.policy.ActorCritic it is ``value_head = nn.Linear(hidden_size, 1)`` on a
hidden state of the actor's own transformer (``share_backbone=True``, the
default): the output of its middle block (``agent.value_layer``; block 1 of this
policy's 2), not the last hidden state, which the next-token prediction owns. One
forward gives both pi(.|s_t) and V(s_t) at every position. The head starts at
zero: V = 0 everywhere before training.

The script computes V by hand (w . h + b) next to score_rollout's values, and
compares the warm agent's values with the return G_t they try to predict. Then it
fits a copy of the head alone on other episodes, once on the actor's features and
once on a separate critic trunk initialised from the reward model
(``share_backbone=False``): how well a linear head can predict the return depends
on the features under it.

Run:  python examples/06_value_head.py [--out DIR] [--seed N] [--episodes N] [--fit-episodes N]
Writes: DIR/06_value_head.json, DIR/06_value_head.png (V(s_t) and G_t per token, six episodes).
"""

from dataclasses import dataclass

import torch
from common import (
    ExampleArgs,
    make_env,
    parse_args,
    print_table,
    rollout,
    save_figure,
    save_json,
    sft_agent,
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.advantages import compute_gae
from agents.losses import value_loss
from agents.policy import ActorCritic
from agents.ppo import explained_variance, score_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import position_ids_from_mask


@dataclass
class Args(ExampleArgs):
    episodes: int = 12
    """Episodes shown."""
    episode: int = 0
    """Which one to tabulate."""
    fit_episodes: int = 64
    """Episodes to fit a fresh value head on."""


args = parse_args(Args, __doc__)
agent, tok = warm_agent(args.out), tokenizer()
separate = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR).eval()
print(f"the critic: agent.value_head = {agent.value_head}, on the output of block {agent.value_layer} of the actor")
batch = rollout(agent, make_env(args.episodes), args.seed)


@torch.no_grad()
def features(trunk, episodes, layer=-1):
    """The trunk's hidden state after block ``layer`` (-1: the last) at the state before each action: (B, T, 128)."""
    mask = episodes.attention_mask
    out = trunk(input_ids=episodes.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                output_hidden_states=True)  # fmt: skip
    return out.hidden_states[layer][:, episodes.prompt_ids.shape[1] - 1 : -1]


def returns_of(episodes):
    """G_t with gamma = 1: GAE with V = 0 and lambda = 1 (see 03). (B, T)"""
    zeros = torch.zeros_like(episodes.rewards)
    return compute_gae(episodes.rewards, zeros, zeros, episodes.terminated_steps, episodes.mask, 1.0, 1.0)[1]


with torch.no_grad():
    values = score_rollout(agent, batch, 1.0).values[:, :-1]  # (B, T): V(s_0) .. V(s_{T-1}), the library
    values_sft = score_rollout(sft_agent(), batch, 1.0).values[:, :-1]  # the untrained head: all zeros
    hidden = features(agent.policy, batch, agent.value_layer)  # h: what the head reads
    values_hand = hidden @ agent.value_head.weight[0] + agent.value_head.bias  # w . h + b
returns, valid = returns_of(batch), batch.mask
print(f"max |hand - library| = {float((values_hand - values).abs().max()):.1e}")
print(f"untrained head: max |V| = {float(values_sft.abs().max()):.1e} (zero-initialised)")
ev = {"warm agent's head": explained_variance(values, returns, valid)}

# Fit a fresh head alone (trunk frozen) on other episodes: 0.5 * (V - G)^2, agents.losses.value_loss unclipped.
fit_batch = rollout(agent, make_env(args.fit_episodes), args.seed + 1)
fitted = {}
probes = {"head fitted on the actor's trunk": (agent.policy, agent.value_layer),  # the block the agent's head reads
          "head fitted on an RM-initialised trunk": (separate.critic, -1)}  # fmt: skip
for label, (trunk, layer) in probes.items():
    train_features = features(trunk, fit_batch, layer)  # (B', T, hidden): 128 for the actor, 64 for the RM
    head = torch.nn.Linear(train_features.shape[-1], 1)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):
        predicted = head(train_features).squeeze(-1)  # (B', T)
        loss, _ = value_loss(predicted, predicted.detach(), returns_of(fit_batch), fit_batch.mask, float("inf"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        fitted[label] = head(features(trunk, batch, layer)).squeeze(-1)  # on the episodes shown, unseen by the fit
    ev[label] = explained_variance(fitted[label], returns, valid)
for label, value in ev.items():
    print(f"explained variance of G_t, {label}: {value:+.3f}  (1: perfect, 0: no better than a constant)")
# Explained variance, 1 - Var(G - V) / Var(G), is blind to a constant offset: V = G - 1 everywhere would score 1.
# So look at the means and at the mean squared error too.
predictions = {"warm agent's head": values, **fitted}
means = {"G_t": float(returns[valid].mean()), **{k: float(v[valid].mean()) for k, v in predictions.items()}}
mse = {k: float(((v - returns)[valid] ** 2).mean()) for k, v in predictions.items()}
returns_variance = float(returns[valid].var(unbiased=False))  # the squared error of the best constant, the mean
print(f"mean of G_t {means['G_t']:+.3f}; " + ", ".join(f"mean V of the {k} {means[k]:+.3f}" for k in predictions))
print("mean squared error (V - G_t)^2: " + ", ".join(f"{k} {v:.3f}" for k, v in mse.items())
      + f"; the best constant (the mean of G_t) would have {returns_variance:.3f}")  # fmt: skip

row = args.episode
steps = int(valid[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {
        "t": t,
        "next token a_t": tokens[t],
        "V_untrained": float(values_sft[row, t]),
        "V(s_t)": float(values[row, t]),
        "V_by_hand": float(values_hand[row, t]),
        "V_fit_rm_trunk": float(fitted["head fitted on an RM-initialised trunk"][row, t]),
        "reward": float(batch.rewards[row, t]),
        "G_t": float(returns[row, t]),
    }
    for t in range(steps)
]
print(f"\nprompt: {batch.prompts[row]!r}\nresponse: {batch.responses[row]!r}")
print_table(table, "the critic's prediction V(s_t) and the return G_t it predicts (gamma = 1)")
save_json(
    args.out,
    "06_value_head.json",
    {"prompt": batch.prompts[row], "explained_variance": ev, "mean": means, "mean_squared_error": mse,
     "returns_variance": returns_variance, "tokens": table},
)  # fmt: skip

fig = Figure(figsize=(13.5, 7.5))
axes = fig.subplots(2, 3, sharey=True)
for b, ax in zip(range(min(6, len(valid))), axes.flat):
    n = int(valid[b].sum())
    ax.plot(range(n), returns[b, :n], "s--", color="black", label="G_t, the actual return")
    ax.plot(range(n), values[b, :n], "o-", label="V(s_t), warm agent's head (PPO-trained)")
    for label, v in fitted.items():
        ax.plot(range(n), v[b, :n], ".-", alpha=0.8, label=f"V(s_t), {label}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(n), token_strings(tok, batch.actions[b, :n]), rotation=70, fontsize=7)
    ax.set_title(f"{batch.prompts[b]!r}, score {float(batch.scores[b]):+.2f}", fontsize=9)
for ax in axes[:, 0]:
    ax.set_ylabel("value / return")
fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=9)
fig.suptitle(
    "The critic: a linear head on a trunk's hidden state predicts the return G_t from each state\n"
    "explained variance over the batch: " + ", ".join(f"{k} {v:+.2f}" for k, v in ev.items())
)
fig.tight_layout(rect=(0, 0.04, 1, 1))
save_figure(fig, args.out, "06_value_head.png")
