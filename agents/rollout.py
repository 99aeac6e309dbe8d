"""Collect a batch of episodes: the agent samples tokens with its own KV cache and steps the env.

The env runs in lockstep (``AutoresetMode.DISABLED``): one ``reset`` starts all B
episodes, and the rollout steps until every one has ended. The policy's KV cache
is the agent's recurrent state, started from the reset's observation (only the
actor is stepped: the update's forward gives the values); each step it passes its
log-probs of the chosen tokens to the env (the fast path: the env then needs no
policy forward of its own for the KL penalty). In episodes of several turns the
environment's replies (``info["env_tokens"]``) enter the same cache.

The layout the update re-scores is exactly the rollout's: the prompt block as the
env showed it (left-padded, cropped to its widest prompt) followed by one column
per token (the agent's steps, and the replies after the steps that ended turns),
masked where the episode had already ended.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.policy import ActorCritic
from textenv import TokenEnvConfig
from textenv.info import REWARD_PREFIX  # the env's info keys of each paying term's raw value
from textenv.lm import CachedStepper, crop_left_padding, sample_tokens


class Rollout(NamedTuple):
    prompt_ids: Tensor  # (B, W) left-padded
    prompt_mask: Tensor  # (B, W)
    actions: Tensor  # (B, T)
    # (B, T) the sampler's log-probs, at sampling time from the KV cache: they price the env's KL penalty, and the
    # update measures its first re-score against them (agents.ppo.sampler_mismatch)
    logprobs: Tensor
    rewards: Tensor  # (B, T) the env's rewards, 0 after the end
    mask: Tensor  # (B, T) bool, True on steps the episode took
    terminated: Tensor  # (B,) bool: ended with EOS
    truncated: Tensor  # (B,) bool: cut off at max_new_tokens
    scores: Tensor  # (B,) reward-model score of each response
    kl: Tensor  # (B, T) log pi - log pi_ref per step, 0 after the end
    ref_logprobs: Tensor  # (B, T) the reference model's log-probs of the actions, 0 after the end
    prompts: list[str]
    responses: list[str]
    reward_terms: dict[str, Tensor]  # per paying term (reward model, each reward function): (B,) its raw value
    # episodes of several turns: (B, T) True on the environment's tokens. Their columns sit between the agent's
    # (``actions`` holds every token after the prompt); they are context, never steps: ``mask`` is False there
    env_mask: Tensor | None = None
    # (B, T + 1) where the agent's critic has a value prior (``ActorCritic.value_prior``): the env's score of the
    # prefix each value V(s_0) .. V(s_T) is read at (``prefix_scores``), 0 past the episode's end
    value_prior: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.actions], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        context = self.mask if self.env_mask is None else self.mask | self.env_mask
        return torch.cat([self.prompt_mask, context.long()], dim=1)

    def select(self, rows: Tensor) -> Rollout:
        """The episodes ``rows`` (tensors indexed; text lists too)."""
        picked = {
            name: t[rows] if isinstance(t, Tensor) else [t[i] for i in rows.tolist()]
            for name, t in self._asdict().items()
            if name not in ("reward_terms", "env_mask", "value_prior")
        }
        optional = {
            name: None if t is None else t[rows]
            for name, t in (("env_mask", self.env_mask), ("value_prior", self.value_prior))
        }
        return Rollout(**picked, reward_terms={n: t[rows] for n, t in self.reward_terms.items()}, **optional)

    @property
    def terminated_steps(self) -> Tensor:
        """(B, T) True at the last step of the episodes that ended with EOS."""
        last = last_step_columns(self.mask)
        steps = torch.zeros_like(self.mask)
        steps[torch.arange(len(last)), last.clamp(min=0)] = True
        return steps & self.terminated[:, None]


def make_rollout_env(num_envs: int, config: TokenEnvConfig | None = None, **kwargs):
    """The lockstep batch of episodes a rollout steps: ``reset`` starts all B, they run until all end."""
    return gym.make_vec(
        "TokenRLHF-v0",
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode=AutoresetMode.DISABLED,
        config=config,
        **kwargs,
    )


@torch.no_grad()
def collect_rollout(
    agent: ActorCritic,
    env,
    temperature: float,
    seed: int,
    generator: torch.Generator,
    autocast: torch.autocast | None = None,
    group_size: int | None = None,
    reset_options: dict | None = None,
    value_prior: bool = True,
) -> Rollout:
    """Run one lockstep batch of ``env.num_envs`` episodes with ``agent`` sampling every token.

    ``group_size`` k: consecutive groups of k episodes share one prompt (RLOO, GRPO).
    ``reset_options``: passed to ``env.reset`` (e.g. ``{"prompt_index": indices}``).
    ``value_prior``: where the agent's critic has a value prior, read its scores (``prefix_scores``; False skips
    them, for a caller that reads no values: an evaluation).
    """
    device = agent.value_head.weight.device
    options = dict(reset_options or {}) | ({} if group_size is None else {"group_size": group_size})
    observation, info = env.reset(seed=seed, options=options or None)
    prompt_ids, prompt_mask = crop_left_padding(
        torch.as_tensor(observation["input_ids"]), torch.as_tensor(observation["attention_mask"])
    )
    config = env.unwrapped.config
    room = config.window(turns=config.interaction is not None)  # cache columns past the prompts: no reallocation
    stepper = CachedStepper(sampling_model(agent), env.unwrapped.tokenizer.pad_token_id, room=room)
    # one autocast context for the whole rollout: it casts each weight once and keeps the copy (the weights do not
    # change within a rollout), where a context a step would cast the LM head again for every token
    with autocast or nullcontext():
        logits = stepper.prefill(prompt_ids, prompt_mask)
        steps, replies_after, endings = step_until_all_end(
            stepper, logits, env, temperature, generator, len(prompt_ids), device
        )
    columns = {name: torch.stack(column, 1).cpu() for name, column in zip(STEP_COLUMNS, zip(*steps))}
    env_mask = None
    if any(replies_after):
        columns, env_mask = interleave(columns, replies_after)
    prior = None
    if value_prior and agent.value_prior:
        prior = prefix_scores(env, prompt_ids, prompt_mask, columns["actions"], columns["mask"], env_mask)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        **columns,
        terminated=torch.as_tensor(endings.terminated),
        truncated=torch.as_tensor(endings.truncated),
        scores=endings.scores,
        prompts=list(info["prompt"]),
        responses=endings.responses,
        reward_terms=endings.terms,
        env_mask=env_mask,
        value_prior=prior,
    )


def prefix_scores(
    env, prompt_ids: Tensor, prompt_mask: Tensor, actions: Tensor, mask: Tensor, env_mask: Tensor | None
) -> Tensor:
    """The env's score of the prefix each value is read at (``Rollout.value_prior``): V(s_t) at the last prompt
    token (t = 0) and at each column's token after it, up to each episode's last step. (B, T + 1) on the host.

    0 from the state after the last step on: the env paid the score at that step (at EOS or at a cut), so none of
    it is still to come. That state's value is the bootstrap of an episode cut at ``max_new_tokens``, whose reward
    already holds the score of the very prefix a prior would add again: with it, a cut episode's return counted the
    score twice, and a run whose responses were often cut learned to be cut (its prior's weight rising far above 1).
    """
    context = mask if env_mask is None else mask | env_mask
    attention = torch.cat([prompt_mask, context.long()], 1)
    scores = env.unwrapped.prefix_scores(torch.cat([prompt_ids, actions], 1), attention).cpu()
    width = prompt_ids.shape[1]
    columns = torch.arange(mask.shape[1] + 1)
    last = last_step_columns(mask)[:, None]
    return torch.where(columns <= last, scores[:, width - 1 :], 0.0)  # V(s_t) for t up to that step's state


def last_step_columns(mask: Tensor) -> Tensor:
    """(B,) the column of each row's last agent step (``mask`` (B, T)); -1 for a row that took none."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, columns, -1).max(1).values


INTERACTION_TERM = "interaction"
"""The ``reward_terms`` key of what an interaction's replies paid each episode (summed over its turns)."""

STEP_COLUMNS = ("actions", "logprobs", "rewards", "mask", "kl", "ref_logprobs")
"""What each step records per row, in the order ``step_until_all_end`` returns it; the ``Rollout`` field names."""


def step_until_all_end(
    stepper: CachedStepper,
    logits: Tensor,
    env,
    temperature: float,
    generator: torch.Generator,
    batch: int,
    device: torch.device,
) -> tuple[list[tuple[Tensor, ...]], list[dict[int, list[int]]], Endings]:
    """Sample a token for every row from ``logits`` and step the env, until every episode has ended.

    Called inside the rollout's autocast context, if any; the env steps outside it (its models run at the
    env's own precision, as an uncached recomputation of them would).

    Returns per step the ``STEP_COLUMNS`` (B,) each, per step the environment's tokens
    appended after it (by row), and the episodes' ``Endings``. A row that has ended keeps
    stepping in lockstep with the others; its log-prob is zeroed and ``mask`` is False.
    """
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    steps: list[tuple[Tensor, ...]] = []
    replies_after: list[dict[int, list[int]]] = []
    endings = Endings.empty(batch)
    # the loop asks the env's host arrays (endings.ended) whether to go on, never the device's ``alive``: on a GPU
    # that would wait for it twice a token. The tokens and log-probs going to the host for env.step are the waits
    # the Gymnasium contract needs (tests/agents/test_host_syncs.py)
    while not endings.ended.all():
        action, logprob = sample_tokens(logits, temperature, generator)
        with torch.autocast(device.type, enabled=False):  # nested: the outer context keeps its cast weights
            _, reward, term, trunc, step_info = env.step(action.cpu().numpy(), logprobs=logprob.cpu().numpy())
        kl, ref_logprob = (
            torch.as_tensor(np.nan_to_num(step_info[key]), dtype=torch.float32) for key in ("kl", "ref_logprob")
        )
        reward = torch.as_tensor(reward, dtype=torch.float32)
        steps.append((action, torch.where(alive, logprob, 0.0), reward, alive, kl, ref_logprob))
        endings.record(term, trunc, step_info)
        stepped, alive = alive, torch.as_tensor(~endings.ended, device=device)
        replies = {row: list(ids) for row, ids in enumerate(step_info.get("env_tokens", ())) if len(ids)}
        replies_after.append(replies)
        if not endings.ended.all():
            logits = stepper.advance(action, stepped)
            if replies:  # the environment's tokens enter the agent's cache as they entered the env's
                logits = stepper.extend(replies)
    return steps, replies_after, endings


@dataclass
class Endings:
    """What the env reports at each episode's last step: its score, response, paying terms, and how it ended."""

    scores: Tensor  # (B,)
    responses: list[str]
    # per paying term (reward model, each reward function): (B,) its raw value; with an interaction, also
    # ``INTERACTION_TERM``: the sum of the rewards its replies paid in the episode (a game's outcome)
    terms: dict[str, Tensor]
    terminated: np.ndarray  # (B,) bool: ended with EOS
    truncated: np.ndarray  # (B,) bool: cut off at max_new_tokens

    @property
    def ended(self) -> np.ndarray:
        """(B,) bool: the episodes that have ended, by EOS or cut off."""
        return self.terminated | self.truncated

    @classmethod
    def empty(cls, batch: int) -> Endings:
        return cls(torch.zeros(batch), [""] * batch, {}, np.zeros(batch, dtype=bool), np.zeros(batch, dtype=bool))

    def record(self, term: np.ndarray, trunc: np.ndarray, step_info: dict) -> None:
        """Keep what ``step_info`` says of the rows whose episode ended in this step, and add up what an
        interaction paid any row in it."""
        batch = len(self.scores)
        if "turn_reward" in step_info:  # paid on any step that ended a turn; NaN on the others
            paid = torch.as_tensor(np.nan_to_num(step_info["turn_reward"]), dtype=torch.float32)
            self.terms[INTERACTION_TERM] = self.terms.get(INTERACTION_TERM, torch.zeros(batch)) + paid
        for row in np.flatnonzero(term | trunc):
            self.scores[row], self.responses[row] = float(step_info["score"][row]), step_info["response"][row]
            for key in step_info:
                if key.startswith(REWARD_PREFIX) and not key.startswith("_"):
                    value = float(step_info[key][row])
                    self.terms.setdefault(key[len(REWARD_PREFIX) :], torch.zeros(batch))[row] = value
        self.terminated |= term
        self.truncated |= trunc


def sampling_model(agent: ActorCritic) -> torch.nn.Module:
    """What the rollout steps: the policy alone, since sampling needs only the actor (a separate critic's trunk
    would run on every token for values nobody reads; the update computes them). Under FSDP the whole agent,
    whose own forward gathers the sharded parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return agent.policy
    return agent if isinstance(agent, FSDPModule) else agent.policy


def interleave(columns: dict[str, Tensor], replies_after: list[dict[int, list[int]]]):
    """Per-step columns (B, T) and the replies after each step -> each row's tokens in context order (B, T').

    A reply's tokens become columns of their own after the step that ended the turn: the
    token in ``actions``, 0 in every other tensor, False in ``mask`` and True in the
    returned ``env_mask``.
    """
    batch = columns["mask"].shape[0]
    rows: list[dict[str, list]] = []
    for row in range(batch):
        out = {name: [] for name in [*columns, "env"]}
        for step in range(columns["mask"].shape[1]):
            if not columns["mask"][row, step]:
                continue
            for name, values in columns.items():
                out[name].append(values[row, step])
            out["env"].append(False)
            for token in replies_after[step].get(row, ()):
                for name, values in columns.items():
                    out[name].append(torch.tensor(token) if name == "actions" else torch.zeros((), dtype=values.dtype))
                out["env"].append(True)
        rows.append(out)
    width = max(len(out["env"]) for out in rows)
    laid = {}
    for name, values in columns.items():
        laid[name] = torch.zeros(batch, width, dtype=values.dtype)
        for row, out in enumerate(rows):
            if out[name]:
                laid[name][row, : len(out[name])] = torch.stack(out[name])
    env_mask = torch.zeros(batch, width, dtype=torch.bool)
    for row, out in enumerate(rows):
        env_mask[row, : len(out["env"])] = torch.tensor(out["env"])
    return laid, env_mask
