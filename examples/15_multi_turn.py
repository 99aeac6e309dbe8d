"""15 - An episode of several turns, token by token: whose token, its reward, its KL, its value, its advantage.

The calculator task (``task="calculator"``): the prompt is ``17+25=``; the agent may
answer at once (``42<eos>``) or call the calculator (``?<eos>``), which appends its
result and a separator (``42:``), and then answer (``42<eos>``). The calculator's
tokens are the environment's, not actions:

    agent token        a step: reward -beta * KL, the turn's reward on a turn's last
                       token, the score (here: the answer is right) on the last one;
                       a value V(s_t), an advantage, a gradient in the update
    environment token  context only: no step, no reward, no KL, no gradient; the
                       agent's KV cache and the update's forward read it like a prompt

The script trains the task's SFT policy with PPO for a few iterations (so the critic
has learned something), samples a batch, picks an episode that called the tool,
and prints its every token. GAE runs over the agent's steps only: the last token of
a turn bootstraps from the value of the state after the calculator's reply
(agents.ppo.gae).

Run:  python examples/15_multi_turn.py [--out DIR] [--seed N] [--iterations N]
Writes: DIR/15_multi_turn.json, DIR/15_multi_turn.png.
"""

import shutil
from dataclasses import dataclass

import torch
from common import ExampleArgs, parse_args, print_table, save_figure, save_json, token_strings
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from agents.policy import ActorCritic
from agents.ppo import PPOConfig, gae, score_rollout
from agents.rollout import collect_rollout, make_rollout_env
from agents.train import RunConfig, TrainConfig, train
from textenv import TokenEnvConfig
from textenv.calculator import POLICY_DIR


@dataclass
class Args(ExampleArgs):
    iterations: int = 20
    """PPO iterations before the episode is shown (0: the SFT policy with an untrained critic)."""
    episodes: int = 32
    """Episodes sampled to find one that calls the calculator."""


args = parse_args(Args, __doc__)
env_config = TokenEnvConfig(task="calculator")  # the task's limits: 3 agent turns of 6 tokens, replies of 6
run_dir = args.out / "15_run"
shutil.rmtree(run_dir, ignore_errors=True)
if args.iterations:
    run = RunConfig(
        run_dir=run_dir, iterations=args.iterations, batch_size=32, eval_every=args.iterations, progress=False
    )
    train(TrainConfig(env=env_config, ppo=PPOConfig(minibatch_size=16), run=run))
    agent = ActorCritic.from_pretrained(run_dir / "final").eval()
else:
    agent = ActorCritic.from_models(POLICY_DIR).eval()
tok = AutoTokenizer.from_pretrained(POLICY_DIR)

env = make_rollout_env(args.episodes, env_config)
batch = collect_rollout(agent, env, 1.0, args.seed, torch.Generator().manual_seed(args.seed))
with torch.no_grad():
    values = score_rollout(agent, batch, 1.0).values  # (B, T + 1): V before each column, replies included
config = PPOConfig()
advantages, returns = gae(batch.rewards, values, batch.terminated_steps, batch.mask, config)

called = batch.env_mask.any(1) if batch.env_mask is not None else torch.zeros(len(batch.actions), dtype=torch.bool)
row = int(called.nonzero()[0, 0]) if called.any() else 0
columns = int((batch.mask[row] | (batch.env_mask[row] if batch.env_mask is not None else batch.mask[row])).sum())
prompt = batch.prompt_ids[row][batch.prompt_mask[row] == 1].tolist()
tokens = token_strings(tok, batch.actions[row, :columns])
rows = []
for column in range(columns):
    agent_token = bool(batch.mask[row, column])
    rows.append(
        {
            "column": column,
            "token": tokens[column],
            "whose": "agent" if agent_token else "calculator",
            "reward": float(batch.rewards[row, column]) if agent_token else None,
            "kl": float(batch.kl[row, column]) if agent_token else None,
            "value": float(values[row, column]) if agent_token else None,
            "advantage": float(advantages[row, column]) if agent_token else None,
            "return": float(returns[row, column]) if agent_token else None,
        }
    )
print(f"prompt {tok.decode(prompt)!r}; score (final_answer) {float(batch.scores[row]):.0f}; "
      f"{int(called.sum())} of {len(called)} episodes called the calculator")  # fmt: skip
shown = [{key: "" if value is None else value for key, value in r.items()} for r in rows]
print_table(shown, "one episode, token by token (calculator tokens: context, not steps)")

save_json(
    args.out,
    "15_multi_turn.json",
    {
        "prompt": tok.decode(prompt),
        "score": float(batch.scores[row]),
        "terminated": bool(batch.terminated[row]),
        "kl_coef": env_config.kl_coef,
        "gamma": config.gamma,
        "lam": config.lam,
        "bootstrap_value": float(values[row, columns]),
        "called_rate": float(called.float().mean()),
        "episodes": len(called),
        "called": int(called.sum()),
        "agent_steps": sum(r["whose"] == "agent" for r in rows),
        "calculator_tokens": sum(r["whose"] == "calculator" for r in rows),
        "tokens": rows,
    },
)

fig = Figure(figsize=(10, 4.5), layout="constrained")
ax = fig.subplots()
xs = range(columns)
for x, r in zip(xs, rows):
    if r["whose"] == "calculator":
        ax.axvspan(x - 0.5, x + 0.5, color="0.88", zorder=0)
agent_x = [x for x, r in zip(xs, rows) if r["whose"] == "agent"]
turns = [[agent_x[0]]]  # the agent's turns: runs of agent columns, split where the calculator's reply sits
for x in agent_x[1:]:
    if x == turns[-1][-1] + 1:
        turns[-1].append(x)
    else:
        turns.append([x])
styles = (("reward", "o-", "tab:green"), ("value", "s--", "tab:grey"), ("advantage", "^-", "tab:purple"))
for key, style, color in styles:
    for i, turn in enumerate(turns):  # one line per turn: nothing is drawn across the environment's tokens
        ax.plot(turn, [rows[x][key] for x in turn], style, color=color, label=key if i == 0 else None)
for before, after in zip(turns, turns[1:]):  # the calculator's reply sits between two turns
    ax.text((before[-1] + after[0]) / 2, 0.5, "the calculator's reply:\ncontext, not actions", ha="center",
            va="center", fontsize=9, color="0.35", transform=ax.get_xaxis_transform())  # fmt: skip
ax.axhline(0, color="black", lw=0.5)
ax.set_xticks(list(xs), [f"{r['token']}" for r in rows])
ax.set_xlabel("token, in order (grey columns: the calculator's reply, context only: no reward, value or advantage)")
ax.set_ylabel("reward units")
ax.set_title(f"{tok.decode(prompt)}  one episode: {len(agent_x)} agent steps in {len(turns)} turns")
ax.legend()
save_figure(fig, args.out, "15_multi_turn.png")
