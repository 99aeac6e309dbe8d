"""08 - The actor loss: from the value V_t, through the return G_t (REINFORCE), to the advantage A_t.

The first idea for an actor loss weighs each token's log-prob by the critic's
estimate of the total return, V_t = V(s_t):

    L_naive = -mean_t V_t * log pi(a_t | s_t)

It fails. V(s_t) depends on the state only, not on the token chosen in it, and for
any weight b(s) that depends on the state only,

    E_{a ~ pi(.|s)}[ b(s) * grad log pi(a|s) ] = b(s) * sum_a grad pi(a|s) = b(s) * grad 1 = 0:

the naive loss carries no information about which choice was good. On a sampled
batch its gradient is not zero, it is noise: with V_t > 0 (as here on almost every
token) a step makes the sampled tokens likelier, the best and the worst alike.

REINFORCE weighs each token by the return actually obtained after it, G_t. Its
expected gradient is the policy gradient, but one sample of it is noisy. Subtracting
V(s_t) from G_t subtracts exactly a term of zero expectation, so the expected
gradient stays the same, and the noise falls as far as V(s_t) is close to the expected
return from s_t. That difference is the advantage,

    A_t = (the return actually obtained from s_t) - V(s_t)          here: A_t = G_t - V_t

(09 refines "actually obtained" with GAE), and the actor loss becomes

    L = -mean_t A_t * log pi(a_t | s_t)

PPO writes it as -mean_t A_t * rho_t with the probability ratio rho_t = pi / pi_old
(agents.losses.policy_loss, see 10); at the first step pi = pi_old, and its gradient
is exactly that of L, since d rho = rho * d log pi = d log pi there.

The script takes one plain SGD step on each of the three losses (V, G, A) from the
same start and shows how each token's log-prob moved against its weight; checks the
gradient equality; and, on one state s_0, samples many first tokens (each followed by a
whole response and its return G) and measures, on the state's logits z (where
grad_z log pi(a|s_0) = e_a - pi, and through which every weight acts), the mean gradient
of V(s_0) * log pi (about 0: the size of its sampling noise, shrinking like 1/sqrt(n))
against that of G * log pi (a vector that settles), and how much each baseline lowers
the spread of one sample's gradient.

Run:  python examples/08_actor_loss.py [--out DIR] [--seed N] [--episodes N] [--lr LR] [--samples N]
Writes: DIR/08_actor_loss.json, DIR/08_actor_loss.png (change of log pi against V_t, G_t and A_t; the
        mean gradient of b * log pi and of G * log pi on one state; one response's V_t, G_t, A_t).
"""

import copy
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
    token_strings,
    tokenizer,
    warm_agent,
)
from matplotlib.figure import Figure

from agents.advantages import compute_gae, masked_mean
from agents.losses import policy_loss
from agents.ppo import PPOConfig, score_rollout


@dataclass
class Args(ExampleArgs):
    episodes: int = 16
    """Episodes in the batch."""
    episode: int | None = None
    """Which episode to tabulate (default: the one with the largest advantage at its first token)."""
    lr: float = 0.05
    """SGD step size."""
    samples: int = 1024
    """Episodes sampled from one state for the baseline's expected gradient."""


args = parse_args(Args, __doc__)
warm, tok, config = warm_agent(args.out), tokenizer(), PPOConfig()
batch = rollout(warm, make_env(args.episodes), args.seed)
mask = batch.mask  # (B, T)


def returns_and_values(agent, episodes):
    """(G_t, V(s_t)) of a batch, both (B, T): G_t with lambda = 1 and V = 0 (see 03), V from the critic."""
    with torch.no_grad():
        v = score_rollout(agent, episodes, 1.0).values[:, :-1]
    zeros = torch.zeros_like(v)
    g, _ = compute_gae(episodes.rewards, zeros, zeros, episodes.terminated_steps, episodes.mask, config.gamma, 1.0)
    return g, v


returns_to_go, values = returns_and_values(warm, batch)  # G_t, V(s_t): actual and predicted
zeros = torch.zeros_like(values)
advantages = torch.where(mask, returns_to_go - values, zeros)  # (B, T) A_t = G_t - V_t: actual minus predicted


def sgd_step(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One SGD step on -mean_t weights_t * log pi(a_t|s_t) from the warm actor: (log pi before, after, gradient)."""
    agent = copy.deepcopy(warm)
    actor = list(agent.policy.parameters())
    logprobs = score_rollout(agent, batch, 1.0).logprobs  # (B, T), with the graph
    loss = -masked_mean(weights * logprobs, mask)
    grads = torch.autograd.grad(loss, actor)
    with torch.no_grad():
        for p, g in zip(actor, grads):
            p -= args.lr * g
        after = score_rollout(agent, batch, 1.0).logprobs
    return logprobs.detach(), after, grads


below = (batch.scores < 0)[:, None] & mask  # tokens of responses the reward model scored negative
steps_taken = {}
for name, weights in (("naive", values), ("reinforce", returns_to_go), ("advantage", advantages)):
    before, after, grads = sgd_step(weights)
    change = after - before  # (B, T)
    steps_taken[name] = {
        "before": before,
        "change": change,
        "grads": grads,
        "share_rising": float(masked_mean((change > 0).float(), mask)),
        "share_rising_negative": float((change > 0)[below].float().mean()),
        "sign_agreement": float(masked_mean(((weights > 0) == (change > 0)).float(), mask)),
    }
naive, reinforce, advantage = (steps_taken[k] for k in ("naive", "reinforce", "advantage"))
change_naive, change_advantage = naive["change"], advantage["change"]
share_positive_values = float(masked_mean((values > 0).float(), mask))
negative_responses = int((batch.scores < 0).sum())
gain = float(masked_mean(advantages * change_advantage, mask))
print(f"critic's V_t > 0 on {share_positive_values:.0%} of tokens")
print(f"naive step on -mean(V_t log pi): log pi rose on {naive['share_rising']:.0%} of tokens; on the tokens of the "
      f"{negative_responses} negatively scored responses: {naive['share_rising_negative']:.0%}")  # fmt: skip
print(f"REINFORCE step on -mean(G_t log pi): {reinforce['sign_agreement']:.0%} of tokens moved with the sign of "
      f"G_t; negatively scored responses' tokens rose on {reinforce['share_rising_negative']:.0%}")  # fmt: skip
print(f"advantage step on -mean(A_t log pi): {advantage['sign_agreement']:.0%} of tokens moved with the sign of A_t; "
      f"negatively scored responses' tokens rose on {advantage['share_rising_negative']:.0%}")  # fmt: skip
print(f"mean(A * change of log pi) = {gain:+.4f} (> 0: the loss went down)")

# PPO's loss at ratio 1 has the same gradient as the textbook loss.
agent = copy.deepcopy(warm)
logprobs = score_rollout(agent, batch, 1.0).logprobs
ppo, _ = policy_loss(logprobs, logprobs.detach(), advantages, mask, config.clip_range)
grad_ppo = torch.autograd.grad(ppo, list(agent.policy.parameters()))
difference = max(float((a - b).abs().max()) for a, b in zip(advantage["grads"], grad_ppo))
size = max(float(g.abs().max()) for g in grad_ppo)
print(f"gradients of -mean(A log pi) and of policy_loss at ratio 1: max |difference| = {difference:.1e} "
      f"(largest entry {size:.1e})")  # fmt: skip


def first_token_example(b: int) -> dict:
    """What the critic expected at the first token of episode b, what the response earned, and the advantage."""
    v0, g0, score = float(values[b, 0]), float(returns_to_go[b, 0]), float(batch.scores[b])
    return {"episode": b, "prompt": batch.prompts[b], "response": batch.responses[b], "V_0": v0, "G_0": g0,
            "score": score, "kl_terms": g0 - score, "A_0": g0 - v0}  # fmt: skip


# The game example on real rows: the critic expected V(s_0), the response earned G_0.
row = int(advantages[:, 0].argmax()) if args.episode is None else args.episode
worst = int(batch.scores.argmin())  # the response the reward model liked least
example, negative_example = first_token_example(row), first_token_example(worst)
for e in (example, negative_example):
    print(f"\n{e['prompt']!r} -> {e['response']!r}\n  the critic expected V(s_0) = {e['V_0']:+.2f}; the response "
          f"earned G_0 = {e['G_0']:+.2f} (score {e['score']:+.2f}, KL terms {e['kl_terms']:+.2f}); advantage "
          f"A_0 = {e['A_0']:+.2f}")  # fmt: skip
steps = int(mask[row].sum())
tokens = token_strings(tok, batch.actions[row, :steps])
table = [
    {"t": t, "token": tokens[t], "V_t": float(values[row, t]), "G_t": float(returns_to_go[row, t]),
     "A_t": float(advantages[row, t]), "log_pi_before": float(naive["before"][row, t]),
     "change_naive": float(change_naive[row, t]), "change_reinforce": float(reinforce["change"][row, t]),
     "change_advantage": float(change_advantage[row, t])}
    for t in range(steps)
]  # fmt: skip
print_table(table, "one episode: V_t, G_t, A_t = G_t - V_t, and how log pi moved under each loss")

# The baseline on one state: many first tokens a ~ pi(.|s_0) from the same prompt, each with the return G that
# followed it. The gradient of log pi(a|s_0) with respect to s_0's logits z is e_a - pi (the score function); every
# weight of the actor reaches log pi through z (chain rule: grad_theta = J^T grad_z), so a mean of 0 here is a mean
# of 0 for every weight.
same = rollout(warm, make_env(args.samples, prompts=[example["prompt"]]), args.seed + 1)
g_same, v_same = returns_and_values(warm, same)
state = same.prompt_ids[0][same.prompt_mask[0] == 1]  # s_0: the prompt, no padding
with torch.no_grad():
    pi = torch.softmax(warm.policy(input_ids=state[None]).logits[0, -1], -1)  # (V,) pi(.|s_0)
first = same.actions[:, 0]  # (N,) the sampled first tokens
assert torch.allclose(torch.log(pi[first]), same.logprobs[:, 0], atol=1e-4)  # the rollout sampled from this pi
score_function = torch.nn.functional.one_hot(first, pi.numel()).float() - pi  # (N, V) grad_z log pi(a_i|s_0)
exact = float((pi @ (torch.eye(pi.numel()) - pi)).norm())  # sum over the whole vocabulary of pi(a) (e_a - pi)
baseline = float(v_same[0, 0])  # V(s_0), the same for every sample: one state
g0 = g_same[:, 0]  # (N,) G_0 of each sample
weightings = {"V(s_0)": torch.full_like(g0, baseline), "mean G": torch.full_like(g0, float(g0.mean())), "G": g0,
              "G - V(s_0)": g0 - baseline, "G - mean G": g0 - g0.mean()}  # fmt: skip
mean_gradient, spread = {}, {}
for name, w in weightings.items():
    per_sample = w[:, None] * score_function  # (N, V) one sample's gradient of w * log pi(a|s_0), over the logits
    mean = per_sample.mean(0)
    mean_gradient[name] = float(mean.norm())
    spread[name] = float((per_sample - mean).square().sum(1).mean().sqrt())  # how far one sample strays from it
counts = [n for n in (2**k for k in range(2, 20)) if n < len(first)] + [len(first)]
curve = {name: [float((w[:n] @ score_function[:n] / n).norm()) for n in counts]
         for name, w in weightings.items() if name in ("V(s_0)", "mean G", "G")}  # fmt: skip
top_tokens = pi.argsort(descending=True)[:8]
per_token = [
    {"token": token_strings(tok, [a])[0], "pi": float(pi[a]), "sampled": int((first == a).sum()),
     "mean_G_after": float(g0[first == a].mean()) if bool((first == a).any()) else None,
     "grad_G": float(weightings["G"] @ score_function[:, a] / len(first)),
     "grad_mean_G": float(weightings["mean G"] @ score_function[:, a] / len(first))}
    for a in top_tokens
]  # fmt: skip
print(f"\none state, s_0 = {example['prompt']!r}: {len(first)} sampled first tokens; V(s_0) = {baseline:+.2f}, "
      f"mean G_0 = {float(g0.mean()):+.2f}")  # fmt: skip
print(f"exactly, over the whole vocabulary: sum_a pi(a) (e_a - pi) = 0 (here its norm is {exact:.0e}), so "
      f"E[b(s) grad log pi(a|s)] = 0 for any b(s)")  # fmt: skip
for name in weightings:
    print(f"  w = {name:11s} |mean_i w_i grad_z log pi(a_i|s_0)| = {mean_gradient[name]:.4f}   noise alone would "
          f"give about {spread[name] / len(first) ** 0.5:.4f} (one sample's spread {spread[name]:.3f})")  # fmt: skip
print_table(per_token, "the mean gradient on the logits of the likeliest first tokens: G's is + where the return "
            "after the token was above average; a constant's is noise")  # fmt: skip

save_json(
    args.out,
    "08_actor_loss.json",
    {"lr": args.lr, "episode": row, "score": example["score"], "loss_ppo": ppo.item(),
     "grad_max_difference": difference, "grad_max": size, "up_fraction_naive": naive["share_rising"],
     "sign_agreement": advantage["sign_agreement"], "mean_advantage_times_change": gain,
     "share_positive_values": share_positive_values, "negative_responses": negative_responses,
     "naive": {k: naive[k] for k in ("share_rising", "share_rising_negative")},
     "reinforce": {k: reinforce[k] for k in ("share_rising", "share_rising_negative", "sign_agreement")},
     "advantage": {k: advantage[k] for k in ("share_rising", "share_rising_negative", "sign_agreement")},
     "example": example, "negative_example": negative_example,
     "baseline": {"prompt": example["prompt"], "samples": len(first), "V_s0": baseline, "mean_G": float(g0.mean()),
                  "exact_expectation_norm": exact, "mean_gradient_norm": mean_gradient, "one_sample_spread": spread,
                  "noise_level": {k: v / len(first) ** 0.5 for k, v in spread.items()},
                  "curve": {"n": counts, **curve}, "top_tokens": per_token},
     "tokens": table,
     "all": {"values": values[mask].tolist(), "returns": returns_to_go[mask].tolist(),
             "advantages": advantages[mask].tolist(), "change_naive": change_naive[mask].tolist(),
             "change_reinforce": reinforce["change"][mask].tolist(),
             "change_advantage": change_advantage[mask].tolist(),
             "score": batch.scores[:, None].expand_as(mask)[mask].tolist()}},
)  # fmt: skip

fig = Figure(figsize=(14, 9.5))
grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.05])
top = [fig.add_subplot(grid[0, i]) for i in range(3)]
for ax in top[1:]:
    ax.sharey(top[0])
negative = batch.scores[:, None].expand_as(mask)[mask] < 0
for ax, weights, step, name, title in (
    (top[0], values, naive, "V_t", f"naive, -mean(V_t log pi):\n{naive['share_rising']:.0%} of tokens pushed up"),
    (top[1], returns_to_go, reinforce, "G_t",
     f"REINFORCE, -mean(G_t log pi):\n{reinforce['sign_agreement']:.0%} move with the sign of G_t"),
    (top[2], advantages, advantage, "A_t = G_t - V_t",
     f"advantage, -mean(A_t log pi):\n{advantage['sign_agreement']:.0%} move with the sign of A_t"),
):  # fmt: skip
    x, y = weights[mask], step["change"][mask]
    ax.scatter(x[~negative], y[~negative], s=12, color="tab:blue", alpha=0.7, label="response scored > 0")
    ax.scatter(x[negative], y[negative], s=12, color="tab:red", alpha=0.7, label="response scored < 0")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.01)  # linear within ±0.01, logarithmic beyond
    ax.set_xlabel(f"weight {name} of the token (reward units)")
    ax.set_title(title + f"; red tokens up: {step['share_rising_negative']:.0%}", fontsize=10)
top[0].set_ylabel("change of log pi(a_t|s_t) after one SGD step\n(nats, symlog)")
top[0].legend(fontsize=8, loc="lower right")
curve_ax = fig.add_subplot(grid[1, 0])
for name, color, label in (("G", "tab:green", "w = G (REINFORCE)"),
                           ("mean G", "tab:orange", f"w = {float(g0.mean()):.2f}, a constant (the mean of G)"),
                           ("V(s_0)", "tab:grey", f"w = V(s_0) = {baseline:.2f}, the critic's baseline")):  # fmt: skip
    curve_ax.loglog(counts, curve[name], "o-", color=color, ms=4, label=label)
    if name != "G":
        curve_ax.loglog(counts, [curve[name][0] * (counts[0] / n) ** 0.5 for n in counts], ":", color=color)
curve_ax.set_xlabel("n, first tokens sampled from s_0")
curve_ax.set_ylabel("norm of mean_i w_i grad_z log pi(a_i|s_0)\n(gradient on the logits z of s_0)")
curve_ax.set_title(f"s_0 = {example['prompt']!r}: a weight that depends on\nthe state only averages to 0 "
                   "(dotted: 1/sqrt(n))", fontsize=10)  # fmt: skip
curve_ax.legend(fontsize=7, loc="lower left")
bars = fig.add_subplot(grid[1, 1])
x = torch.arange(len(per_token))
bars.bar(x - 0.2, [r["grad_G"] for r in per_token], 0.4, color="tab:green", label="w = G")
bars.bar(x + 0.2, [r["grad_mean_G"] for r in per_token], 0.4, color="tab:orange", label="w = the constant mean of G")
bars.axhline(0, color="grey", lw=0.8)
after = [f"{r['mean_G_after']:+.2f}" if r["sampled"] else "not sampled" for r in per_token]
bars.set_xticks(x, [f"{r['token']} ({g})" for r, g in zip(per_token, after)], fontsize=8, rotation=35,
               ha="right")  # fmt: skip
bars.set_xlabel("the 8 likeliest first tokens (mean G after each)")
bars.set_ylabel("mean gradient on the token's logit")
bars.set_title(f"Over {len(first)} samples: G raises the tokens that did\nbetter than average; a constant does nothing",
               fontsize=10)  # fmt: skip
bars.legend(fontsize=8)
right = fig.add_subplot(grid[1, 2])
x = torch.arange(steps)
right.bar(x - 0.27, [r["V_t"] for r in table], 0.27, color="tab:grey", label="V_t (predicted)")
right.bar(x, [r["G_t"] for r in table], 0.27, color="tab:green", label="G_t (obtained)")
right.bar(x + 0.27, [r["A_t"] for r in table], 0.27, color="tab:purple", label="A_t = G_t - V_t")
right.axhline(0, color="grey", lw=0.8)
right.set_xticks(x, tokens, rotation=45, fontsize=8)
right.set_xlabel("response token a_t")
right.set_ylabel("reward units")
right.set_title(f"{example['response'].strip()!r}: expected {example['V_0']:+.2f},\nearned {example['G_0']:+.2f}, "
                f"advantage {example['A_0']:+.2f}", fontsize=10)  # fmt: skip
right.set_ylim(top=1.3 * max(max(r["G_t"], r["A_t"]) for r in table))
right.legend(fontsize=7, loc="upper center", ncol=3)
fig.suptitle("The actor loss: weigh log pi by the value (every sampled token goes up), the return (REINFORCE) or "
             "the advantage (better or worse than expected)")  # fmt: skip
fig.tight_layout()
save_figure(fig, args.out, "08_actor_loss.png")
