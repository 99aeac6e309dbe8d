"""04 - The four roles of RLHF-PPO, and which of them are trained (checked on .grad).

- actor: the language model being trained (agent.policy, its LM head gives pi(a|s));
- critic: a value head on the actor's own trunk (agent.value_head), predicts the return;
- reference model: a frozen copy of the SFT model, for the KL penalty (held by the env);
- reward model: a frozen scorer of (prompt, response) (held by the env).

The script loads the reference and the reward model itself and hands them to the
env, runs one real PPO update (agents.ppo.ppo_update, one optimizer step), then
looks at every parameter's .grad and compares the weights before and after. It also
backpropagates the actor loss alone and the critic loss alone to show which
parameters each one reaches.

It also draws the four models and one training iteration between them (which are
trained, which frozen, what flows where, with textenv's and DeepSpeed-Chat's names):
examples/four_models.py, which also writes the copy in docs/figures/.

Run:  python examples/04_four_roles.py [--out DIR] [--seed N]
Writes: DIR/04_four_roles.json, DIR/04_four_roles.png (gradient norm per parameter group and role),
        DIR/04_four_models.png (the diagram).
"""

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
    tokenizer,
    warm_agent,
)
from four_models import NAME as DIAGRAM
from four_models import draw as draw_four_models
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from agents.advantages import compute_gae, masked_whiten
from agents.losses import policy_loss, value_loss
from agents.ppo import PPOConfig, ppo_update, score_rollout
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

args = parse_args(ExampleArgs, __doc__)
agent = warm_agent(args.out)  # actor + critic, one module: ActorCritic(policy=GPT-2 LM, value_head=Linear(128, 1))
reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR, num_labels=1)
env = make_env(8, reference_model=reference, reward_model=reward_model, tokenizer=tokenizer())  # the env freezes both
roles = {
    "actor (policy LM)": list(agent.policy.named_parameters()),
    "critic (value head)": list(agent.value_head.named_parameters()),
    "reference model": list(reference.named_parameters()),
    "reward model": list(reward_model.named_parameters()),
}
before = {role: [p.detach().clone() for _, p in params] for role, params in roles.items()}

batch = rollout(agent, env, args.seed)  # the env uses reference and reward model to pay the rewards
config = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=8)  # one optimizer step
optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=config.learning_rate, eps=1e-5)
generator = torch.Generator().manual_seed(args.seed)
metrics = ppo_update(agent.train(), optimizer, batch, config, 1.0, generator, kl_coef=env.kl_coef)

summary = []
for role, params in roles.items():
    grads = [p.grad for _, p in params]
    summary.append(
        {
            "role": role,
            "tensors": len(params),
            "numel": sum(p.numel() for _, p in params),
            "requires_grad": sum(p.requires_grad for _, p in params),
            "grad_not_None": sum(g is not None for g in grads),
            "grad_nonzero": sum(g is not None and bool(g.abs().sum() > 0) for g in grads),
            "grad_norm": float(np.sqrt(sum(float(g.norm()) ** 2 for g in grads if g is not None))),
            "changed_by_update": sum(not torch.equal(p, b) for (_, p), b in zip(params, before[role])),
        }
    )
print_table(summary, "after one ppo_update: the .grad of every parameter tensor, and which tensors changed")
print(f"(policy loss {metrics['loss/policy']:+.4f}, value loss {metrics['loss/value']:.4f})")


# Which parameters does each loss reach? Backpropagate them one at a time (the library's losses).
def group(name: str) -> str:
    if name.startswith("value_head"):
        return "value_head"
    if name == "policy.transformer.wte.weight":
        return "wte (= LM head, tied)"
    if ".h." in name:
        return "trunk block " + name.split(".h.")[1].split(".")[0]
    return name.removeprefix("policy.transformer.").removesuffix(".weight").removesuffix(".bias")


scored = score_rollout(agent, batch, 1.0)  # logprobs (B, T), values (B, T + 1) with the graph attached
advantages, returns = compute_gae(
    batch.rewards, scored.values[:, :-1].detach(), scored.values[:, 1:].detach(),
    batch.terminated_steps, batch.mask, config.gamma, config.lam,
)  # fmt: skip
losses = {
    "actor loss only": policy_loss(
        scored.logprobs, scored.logprobs.detach(), masked_whiten(advantages, batch.mask), batch.mask, 0.2
    )[0],
    "critic loss only": value_loss(scored.values[:, :-1], scored.values[:, :-1].detach(), returns, batch.mask, 0.2)[0],
}
per_loss = {}
for label, loss in losses.items():
    agent.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    norms: dict[str, float] = {}
    for name, p in agent.named_parameters():
        size = 0.0 if p.grad is None else float(p.grad.norm())
        norms[group(name)] = float(np.hypot(norms.get(group(name), 0.0), size))  # norm over the group
    per_loss[label] = norms
groups = list(per_loss["actor loss only"])
print_table(
    [{"parameter group": g, **{k: v[g] for k, v in per_loss.items()}} for g in groups], "gradient norm per loss"
)
print("wte is GPT-2's token embedding and, tied to it, the LM head; the value head sits on the same trunk.")
save_json(args.out, "04_four_roles.json", {"roles": summary, "grad_norm_per_loss": per_loss})

fig = Figure(figsize=(13, 4.5))
left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
colors = ["tab:green" if s["grad_nonzero"] else "tab:grey" for s in summary]
left.barh([s["role"] for s in summary], [s["grad_norm"] for s in summary], color=colors)
for i, s in enumerate(summary):
    text = (
        f"trained: {s['grad_nonzero']}/{s['tensors']} tensors have .grad"
        if s["grad_nonzero"]
        else (f"frozen: requires_grad=False, .grad is None ({s['numel']:,} params)")
    )
    left.text(max(s["grad_norm"], 0) + 0.01, i, text, va="center", fontsize=8)
left.invert_yaxis()
left.set_xlim(0, 2.2 * max(s["grad_norm"] for s in summary))
left.set_xlabel("norm of .grad after one ppo_update (all grads clipped jointly to norm 1)")
left.set_title("The four roles: two trained, two frozen")
y = np.arange(len(groups))
for k, (label, norms) in enumerate(per_loss.items()):
    right.barh(y + 0.4 * k - 0.2, [norms[g] for g in groups], height=0.4, label=label)
    for i, g in enumerate(groups):
        if norms[g] == 0:
            right.text(0, i + 0.4 * k - 0.2, f" 0: {label} sends no gradient here", va="center", fontsize=8)
right.set_yticks(y, groups)
right.invert_yaxis()
right.set_xscale("symlog", linthresh=1e-3)
right.set_xlabel("gradient norm (symlog scale; 0 = no gradient)")
right.set_title("Where each loss sends gradients (actor-critic only)")
right.legend(loc="upper left", bbox_to_anchor=(0, -0.15), ncol=2)
fig.tight_layout()
save_figure(fig, args.out, "04_four_roles.png")
save_figure(draw_four_models(), args.out, DIAGRAM)
