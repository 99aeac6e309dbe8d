"""The calculator task's report: how often does the SFT policy call the tool, copy it, and answer right?

    python -m textenv.calculator report [--samples N]

plays episodes on the eval prompts with a plain loop of its own: the policy
samples a token (temperature 1, or greedily); when it emits EOS its turn ends
and ``Calculator().respond`` gets a ``textenv.turns.Turn``; a ``Reply`` with text
has its tokens appended to the context and the policy writes its next turn, a
``Reply(done=True)`` ends the episode. A turn of ``max_new_tokens`` without EOS,
or a reply after the ``max_turns``-th turn, truncates it (as in the env). Then:

- ``episode/success`` and ``episode/success_greedy``: the task's reward, ``final_answer``;
- ``tool/call_rate``: share of episodes whose first turn is the call ``?``;
- ``tool/copy_accuracy``: share of those whose next turn is the calculator's result, then EOS;
- ``direct/accuracy``: ``final_answer`` over the episodes that did not call
  (this and ``tool/copy_accuracy`` are None when no episode counts);
- ``policy/eos_rate``: share of agent turns that ended with EOS;
- ``episode/turns_mean``: agent turns per episode.

Every step is a full forward over the whole context (no KV cache: an episode is
at most about 40 tokens), so the loop checks the saved model and the
``Calculator`` independently of the env's cached stepping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from textenv.calculator import CALL, MAX_NEW_TOKENS, MAX_TURNS, SEPARATOR, Calculator, final_answer
from textenv.default_task.report import figure_lines
from textenv.lm import pad_batch, position_ids_from_mask, sample_tokens
from textenv.turns import Interaction, Turn, check_reply


@dataclass
class Episode:
    """One simulated episode: the prompt, then agent turns and environment replies."""

    row: dict
    prompt_ids: list[int]
    segments: list[tuple[str, list[int]]] = field(default_factory=list)
    """(speaker, ids) after the prompt, speaker 'agent' (a whole turn) or 'env'."""
    turn: list[int] = field(default_factory=list)
    """The agent's tokens of the turn in progress."""
    terminated: bool = False
    truncated: bool = False

    @property
    def over(self) -> bool:
        return self.terminated or self.truncated

    @property
    def context_ids(self) -> list[int]:
        return self.prompt_ids + [t for _, ids in self.segments for t in ids] + self.turn

    @property
    def response_ids(self) -> list[int]:
        return self.context_ids[len(self.prompt_ids) :]

    def agent_turns(self) -> list[list[int]]:
        return [ids for speaker, ids in self.segments if speaker == "agent"]


def step(
    episode: Episode,
    token: int,
    tokenizer: PreTrainedTokenizerBase,
    interaction: Interaction,
    max_turns: int,
    max_new_tokens: int,
) -> None:
    """Append the agent's ``token``; at EOS end its turn and let ``interaction`` answer."""
    episode.turn.append(token)
    if token != tokenizer.eos_token_id:
        episode.truncated = len(episode.turn) >= max_new_tokens
        return
    turn = Turn(
        prompt=episode.row["prompt"],
        row={k: v for k, v in episode.row.items() if k != "prompt"},
        context_ids=episode.context_ids,
        turn_ids=list(episode.turn),
        turn_text=tokenizer.decode(episode.turn, skip_special_tokens=True),
        index=len(episode.agent_turns()),
        history=[(s, tokenizer.decode(ids, skip_special_tokens=True)) for s, ids in episode.segments],
    )
    reply = check_reply(interaction.respond(turn), type(interaction).__name__)
    episode.segments.append(("agent", turn.turn_ids))
    episode.turn = []
    if reply.done:
        episode.terminated = True
    elif len(episode.agent_turns()) >= max_turns:
        episode.truncated = True  # a reply after the last allowed turn: a limit outside the task
    else:
        ids = reply.token_ids if reply.token_ids is not None else tokenizer(reply.text or "")["input_ids"]
        episode.segments.append(("env", list(ids)))


@torch.no_grad()
def simulate(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    interaction: Interaction | None = None,
    max_turns: int = MAX_TURNS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float | None = 1.0,
    generator: torch.Generator | None = None,
) -> list[Episode]:
    """Play one episode per row (all in one batch); ``temperature=None`` decodes greedily."""
    interaction = Calculator() if interaction is None else interaction
    episodes = [Episode(row, tokenizer(row["prompt"])["input_ids"]) for row in rows]
    live = episodes
    while live:
        ids, mask = pad_batch([e.context_ids for e in live], tokenizer.pad_token_id, side="left")  # (B, T)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        if temperature is None:
            tokens = logits.argmax(-1)  # (B,)
        else:
            tokens, _ = sample_tokens(logits, temperature, generator)  # (B,)
        for episode, token in zip(live, tokens.tolist()):
            step(episode, token, tokenizer, interaction, max_turns, max_new_tokens)
        live = [e for e in live if not e.over]
    return episodes


def reward(episode: Episode, tokenizer: PreTrainedTokenizerBase) -> float:
    """``final_answer`` of the episode, called as the env calls a reward function."""
    response = tokenizer.decode(episode.response_ids, skip_special_tokens=True)
    prompt = episode.row["prompt"]
    return final_answer(prompt=prompt, response=response, response_ids=episode.response_ids, row=episode.row)


def episode_figures(episodes: list[Episode], tokenizer: PreTrainedTokenizerBase) -> dict:
    """The sampled figures of the module docstring over ``episodes``. A flat dict."""
    eos = tokenizer.eos_token_id

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def copies(e: Episode) -> bool:  # the turn after the first reply is the reply's result, then EOS
        speakers = [speaker for speaker, _ in e.segments]
        if "env" not in speakers or len(speakers) < speakers.index("env") + 2:
            return False
        reply, answer = e.segments[speakers.index("env")][1], e.segments[speakers.index("env") + 1][1]
        return text(answer) == text(reply).removesuffix(SEPARATOR) and answer[-1] == eos

    called = [bool(e.agent_turns()) and text(e.agent_turns()[0]) == CALL for e in episodes]
    copied = [copies(e) for e, c in zip(episodes, called) if c]
    rewards = [reward(e, tokenizer) for e in episodes]
    turns = [t for e in episodes for t in e.agent_turns()] + [e.turn for e in episodes if e.turn]

    def share(values: list) -> float | None:  # None (JSON null) when no episode counts
        return float(np.mean(values)) if values else None

    return {
        "episode/success": float(np.mean(rewards)),
        "tool/call_rate": float(np.mean(called)),
        "tool/copy_accuracy": share(copied),
        "direct/accuracy": share([r for r, c in zip(rewards, called) if not c]),
        "policy/eos_rate": float(np.mean([t[-1] == eos for t in turns])),
        "episode/turns_mean": float(np.mean([len(e.agent_turns()) + bool(e.turn) for e in episodes])),
    }


def calculator_report(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    n_samples: int = 1000,
    seed: int = 0,
) -> dict:
    """The figures of the module docstring, over ``n_samples`` episodes cycling through ``rows``. A flat dict."""
    policy.eval()
    sampled_rows = [rows[i % len(rows)] for i in range(n_samples)]
    episodes = simulate(policy, tokenizer, sampled_rows, generator=torch.Generator().manual_seed(seed))
    greedy = simulate(policy, tokenizer, rows, temperature=None)
    figures = episode_figures(episodes, tokenizer)
    return {
        "episode/success": figures.pop("episode/success"),
        "episode/success_greedy": float(np.mean([reward(e, tokenizer) for e in greedy])),
        **figures,
        "policy/n_samples": n_samples,
        "policy/n_prompts": len(rows),
        "samples": [
            {
                "prompt": e.row["prompt"],
                "response": tokenizer.decode(e.response_ids),
                "answer": e.row["answer"],
                "reward": reward(e, tokenizer),
                "truncated": e.truncated,
            }
            for e in episodes[:10]
        ],
    }


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    lines = ["Episodes (eval prompts, temperature 1, the calculator answering):"]
    for s in report["samples"]:
        mark = "right" if s["reward"] == 1.0 else f"wrong (answer {s['answer']})"
        lines.append(f"  {s['prompt']}{s['response']}{' [truncated]' if s['truncated'] else ''}  {mark}")
    lines.append("")
    return "\n".join(lines + figure_lines(report))
