"""02 - State, action and reward for a language model.

- state s_t: the context, i.e. the prompt plus the tokens written so far. The env's
  observation is that context as token ids in a fixed window of 48 (16 prompt + 32
  response), right-aligned: padding on the left, the newest token at index -1.
- action a_t: the next token, an id in Discrete(vocab_size).
- reward r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) + [last step] * score,
  a KL penalty on every token and the reward model's score on the last one.

The agent here has had a few PPO iterations (``common.warm_agent``), so it differs
from the reference and the KL part of the reward is not zero.

Run:  python examples/02_state_action_reward.py [--out DIR] [--seed N]
Writes: DIR/02_state_action_reward.json, DIR/02_observation_window.png (the state, step by step).
"""

import gymnasium as gym
import numpy as np
import torch
from common import ExampleArgs, parse_args, print_table, save_figure, save_json, token_strings, tokenizer, warm_agent
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from textenv.lm import position_ids_from_mask, sample_tokens

args = parse_args(ExampleArgs, __doc__)
agent, tok = warm_agent(args.out), tokenizer()
env = gym.make("TokenRLHF-v0", policy=agent.policy, device="cpu")  # the env computes log pi for the KL term
beta = env.unwrapped.kl_coef
generator = torch.Generator().manual_seed(args.seed)
print(f"action space: {env.action_space} (one id per token of the vocabulary); beta = {beta}")
print(f"observation space: {env.observation_space}")

observation, info = env.reset(seed=args.seed)
prompt, windows, steps, done = info["prompt"], [], [], False
while not done:
    ids, mask = (torch.as_tensor(observation[k])[None] for k in ("input_ids", "attention_mask"))  # (1, 48) each
    windows.append(observation["input_ids"].copy())
    with torch.no_grad():
        logits = agent(ids, mask, position_ids_from_mask(mask)).logits[:, -1]  # (1, V)
    action, _ = sample_tokens(logits, 1.0, generator=generator)
    state = observation["input_ids"][observation["attention_mask"] == 1]  # the real tokens of s_t
    observation, reward, terminated, truncated, info = env.step(int(action))
    done = terminated or truncated
    steps.append(
        {
            "t": len(steps),
            "state (last 5 tokens of s_t)": "…" + tok.decode(state[-5:]),
            "action": int(action),
            "token": token_strings(tok, [int(action)])[0],
            "kl": info["kl"],
            "-beta*kl": info["non_score_reward"],
            "score": info["score"] if info["score"] is not None else 0.0,
            "reward": reward,
            "state_ids": state.tolist(),
            "next_newest_token": int(observation["input_ids"][-1]),
        }
    )

print(f"prompt: {prompt!r}\nresponse: {info['response']!r}")
print_table([{k: v for k, v in s.items() if not k.endswith("_ids")} for s in steps], "s_t, a_t, r_t per step")
print("\nreward = -beta*kl on every step, + the reward model's score on the last step")
save_json(args.out, "02_state_action_reward.json", {"prompt": prompt, "kl_coef": beta, "steps": steps})

# The state as the agent sees it: one row per step, the 48-token window sliding left as tokens arrive.
windows = np.stack(windows)  # (T, 48)
prompt_length = len(steps[0]["state_ids"])
kind = np.zeros(windows.shape)  # 0 pad, 1 prompt, 2 response
for t in range(len(windows)):
    kind[t, windows.shape[1] - prompt_length - t :] = 1
    kind[t, windows.shape[1] - t :] = 2
shown = min(windows.shape[1], prompt_length + len(steps) + 2)  # drop the columns that are padding in every row
fig = Figure(figsize=(0.55 * shown + 2, 0.42 * len(windows) + 1.8))
ax = fig.subplots()
ax.imshow(kind[:, -shown:], cmap=ListedColormap(["#eeeeee", "#9ecae1", "#fdae6b"]), aspect="auto")
for t in range(len(windows)):
    labels = token_strings(tok, windows[t, -shown:])
    for c, label in enumerate(labels):
        ax.text(c, t, "" if kind[t, c - shown] == 0 else label, ha="center", va="center", fontsize=7, rotation=0)
    ax.text(shown - 0.5 + 0.3, t, f"→ a_{t} = {steps[t]['token']!r}, r = {steps[t]['reward']:+.3f}", va="center")
ax.set_yticks(range(len(windows)), [f"s_{t}" for t in range(len(windows))])
ax.set_xticks(range(shown), [str(i - shown) for i in range(shown)], fontsize=7)
ax.set_xlabel(
    f"position in the {windows.shape[1]}-token observation window (last {shown} shown; -1 = newest token)\n"
    "grey: padding, blue: prompt, orange: response"
)
ax.set_title("The state s_t is the context so far: prompt + tokens written (right-aligned window)")
save_figure(fig, args.out, "02_observation_window.png")
