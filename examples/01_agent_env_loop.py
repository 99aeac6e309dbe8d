"""01 - The agent/environment loop, where the agent is a language model.

RL is a loop: the environment shows an observation, the agent picks an action,
the environment answers with a reward and the next observation, until the
episode ends. In textenv the environment is ``TokenRLHF-v0`` (a Gymnasium env)
and the agent is a causal LM: each action is one token, an episode is one
response to one prompt. This script runs that loop by hand for one episode with
the SFT model as the agent and prints every turn of it.

Run:  python examples/01_agent_env_loop.py [--out DIR] [--seed N]
Writes: DIR/01_agent_env_loop.json (the turns), DIR/01_agent_env_loop.png (rewards and return per step).
"""

import gymnasium as gym
import numpy as np
import torch
from common import ExampleArgs, parse_args, print_table, save_figure, save_json, sft_agent, token_strings, tokenizer
from matplotlib.figure import Figure

from textenv.lm import position_ids_from_mask, sample_tokens

args = parse_args(ExampleArgs, __doc__)
agent, tok = sft_agent(), tokenizer()
# policy= lets the single env compute log pi itself, for the KL term of the reward (see 05)
env = gym.make("TokenRLHF-v0", policy=agent.policy, device="cpu")
generator = torch.Generator().manual_seed(args.seed)

observation, info = env.reset(seed=args.seed)  # observation: {"input_ids": (48,), "attention_mask": (48,)}
prompt = info["prompt"]
print(f"prompt: {prompt!r}")
turns, done, episode_return = [], False, 0.0
while not done:
    # --- the agent: read the observation, choose the next token -------------------------------
    ids = torch.as_tensor(observation["input_ids"])[None]  # (1, 48), prompt + tokens so far, left-padded
    mask = torch.as_tensor(observation["attention_mask"])[None]  # (1, 48), 1 on real tokens
    with torch.no_grad():
        logits = agent(ids, mask, position_ids_from_mask(mask)).logits[:, -1]  # (1, V) next-token logits
    action, logprob = sample_tokens(logits, temperature=1.0, generator=generator)  # (1,), (1,) from softmax(logits)
    # --- the environment: apply it, pay a reward, show the next observation ------------------
    observation, reward, terminated, truncated, info = env.step(int(action))
    done = terminated or truncated
    episode_return += reward
    turns.append(
        {
            "t": len(turns),
            "context_tokens": int(mask.sum()),
            "action": int(action),
            "token": token_strings(tok, [int(action)])[0],
            "log_prob": float(logprob),
            "reward": reward,
            "return_so_far": episode_return,
            "terminated": terminated,
            "truncated": truncated,
            "newest_obs_token": int(observation["input_ids"][-1]),
        }
    )

print_table(turns, "one episode, one row per turn of the loop")
print(f"\nresponse: {info['response']!r}")
print(f"reward-model score {info['score']:+.3f}; return (sum of rewards) {episode_return:+.3f}")
print(
    "The actor is still the reference (SFT) model, so the KL term is 0 and only the last step pays;\n"
    "05_kl_penalty.py shows the per-token rewards of an actor that has drifted."
)
save_json(
    args.out,
    "01_agent_env_loop.json",
    {"prompt": prompt, "response": info["response"], "score": info["score"], "turns": turns},
)

steps, labels = np.arange(len(turns)), [t["token"] for t in turns]
fig = Figure(figsize=(max(6, 0.5 * len(turns)), 5.5))
top, bottom = fig.subplots(2, 1, sharex=True)
top.bar(steps, [np.exp(t["log_prob"]) for t in turns], color="tab:green")
top.set_ylabel("pi(a_t | s_t)")
top.set_ylim(0, 1)
top.set_title(f"Agent: probability of the token it sampled\nprompt: {prompt!r}")
bottom.bar(steps, [t["reward"] for t in turns], color="tab:blue", label="reward r_t returned by env.step")
bottom.plot(steps, [t["return_so_far"] for t in turns], "o-", color="tab:orange", label="sum of rewards so far")
bottom.axhline(0, color="grey", lw=0.8)
bottom.set_xticks(steps, labels, rotation=60)
bottom.set_xlabel("step t: the action a_t (token) the agent chose")
bottom.set_ylabel("reward")
bottom.set_title("Environment: reward per step")
bottom.legend(loc="upper left")
fig.tight_layout()
save_figure(fig, args.out, "01_agent_env_loop.png")
