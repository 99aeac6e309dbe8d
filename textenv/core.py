"""The batched core of TokenRLHF-v0: N token-generation episodes stepped together.

Both public envs are thin views of this class (``TokenGenerationEnv`` holds one
slot, ``TokenGenerationVectorEnv`` N), so the dynamics are written once, in
``TokenBatchCore.step``:

1. the KL term of each live slot's action, from the acting policy's and the
   reference model's log-probs;
2. the action joins the slot's tokens (``textenv.slots.Slots``);
3. the turn machinery (``textenv.turns.Turns``) says which turns and episodes
   ended and what the environment appends; a single-turn episode is the case of
   an interaction whose first reply ends it, so there is one end-of-episode path;
4. the score of the episodes that ended: the reward model's (a
   ``textenv.scorers.Scorer``), the missing-EOS penalty, the reward functions
   (``textenv.reward_fns``) and a step reward;
5. every KV cache takes the tokens of the episodes that go on, and the replies.

Per frozen model the core keeps one KV cache shared by all slots
(``textenv.lm.CachedStepper``): a step runs one forward over the N new tokens,
never the whole context. A slot that starts a new prompt while others go on has
its row of every cache recomputed and left-padded to the cache's current length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from textenv.config import TokenEnvConfig
from textenv.info import REWARD_PREFIX, slot_info
from textenv.lm import CachedStepper, pad_batch, token_logprobs
from textenv.loading import Task
from textenv.reward_fns import REWARD_MODEL_TERM, function_terms, step_rewards, weighted_sum
from textenv.rewards import missing_eos_terms, non_score_reward
from textenv.scorers import DenseScorer, build_scorer
from textenv.slots import Slots
from textenv.turns import Ends, SingleTurn, Turns

LOGPROB_TOLERANCE = 1e-4  # log_softmax can round a little above 0 (bf16); a probability is far above


def check_logprob_values(logprobs: Tensor, live: Tensor, what: str) -> Tensor:
    """Log-probs of chosen tokens must be finite and <= 0 on live slots (a positive one is a probability)."""
    bad = live & (~torch.isfinite(logprobs) | (logprobs > LOGPROB_TOLERANCE))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{what} must be finite log-probabilities (<= 0) of the chosen tokens; slot {row} has "
            f"{float(logprobs[row])} (-inf: the policy gave its own action probability 0; > 0: probabilities or "
            "logits instead of log-probs?)"
        )
    return logprobs


def as_float_tensor(values, device, expected: str) -> Tensor:
    """``values`` as a float32 tensor on ``device``; what is not numbers (None, text, objects, ragged lists) raises a
    TypeError that starts with ``expected`` and says what came instead."""
    try:
        return torch.as_tensor(values, device=device, dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{expected}; got {type(values).__name__} {repr(values)[:80]} ({error})") from None


@dataclass
class StepResult:
    """What one core step produced, per slot (arrays of shape (N,))."""

    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: dict[str, np.ndarray]

    def slot_info(self, slot: int) -> dict[str, Any]:
        """Slot ``slot``'s info as a single env reports it (``textenv.info.slot_info``)."""
        return slot_info(self.infos, self.terminated, self.truncated, slot)


class TokenBatchCore:
    """N slots of prompt + response, a frozen reference and reward model, and the reward of each step."""

    def __init__(self, config: TokenEnvConfig, task: Task, num_slots: int):
        self.config, self.num_slots = config, num_slots
        self.tokenizer, self.prompts, self.prompt_ids = task.tokenizer, task.prompts, task.prompt_ids
        self.rows = task.rows
        self.reward_model, self.vocab_size = task.reward_model, task.vocab_size
        self.eos_token_id, self.pad_token_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.kl_coef = config.kl_coef
        self.context_length = task.context_length or config.context_length
        room = self.context_length  # cache columns past the prompts: an episode's tokens fit without reallocating
        self.reference = CachedStepper(task.reference_model, self.pad_token_id, room=room)
        self.device = self.reference.device
        # a module is stepped as a causal LM with its own KV cache; any other callable is called on observations
        is_module = isinstance(config.policy, torch.nn.Module)
        self.policy = CachedStepper(config.policy, self.pad_token_id, room=room) if is_module else None
        self.policy_fn = None if is_module else config.policy
        self.reward_fns, self.step_reward_fn = task.reward_fns, task.step_reward_fn
        self.accuracy = task.accuracy  # the reward function that checks answers, where the task has one
        self.slots = Slots(self.tokenizer, self.prompts, self.prompt_ids, self.rows, num_slots, self.context_length)
        self.multi_turn = task.interaction is not None
        end_ids = (self.eos_token_id,) if task.end_of_turn_id is None else (task.end_of_turn_id, self.eos_token_id)
        self.turns = Turns(task.interaction or SingleTurn(), end_ids, self.slots, config, self.vocab_size)
        self.scorer = build_scorer(task, config, self.slots)
        for name, stepper in self.named_steppers():
            stepper.check_cache(self.eos_token_id, name)
        self.done = np.ones(num_slots, dtype=bool)  # every slot needs a reset first

    @property
    def prompt_index(self) -> np.ndarray:
        """(N,) the prompt each slot is on."""
        return self.slots.prompt_index

    @property
    def steppers(self) -> list[CachedStepper]:
        """The causal LMs stepped with the context: the reference and, if given as a module, the policy."""
        return [self.reference] if self.policy is None else [self.reference, self.policy]

    def named_steppers(self) -> list[tuple[str, CachedStepper]]:
        """Every model the core steps with a KV cache, with the name of its argument."""
        named = [("reference model", self.reference), ("policy", self.policy)]
        if isinstance(self.scorer, DenseScorer):
            named.append(("reward model", self.scorer.stepper))
        return [(name, stepper) for name, stepper in named if stepper is not None]

    # ---------------------------------------------------------------- reset
    def reset(self, rows: np.ndarray, prompt_index: np.ndarray) -> None:
        """Start slots ``rows`` on prompts ``prompt_index`` (both (K,), K <= N)."""
        for row, index in zip(rows, prompt_index):
            self.slots.start(row, index)
            self.turns.reset(row)
            self.done[row] = False
        rows_t = torch.as_tensor(rows, device=self.device)
        ids, mask = pad_batch([self.prompt_ids[i] for i in prompt_index], self.pad_token_id, side="left")
        for stepper in self.steppers:
            stepper.start(rows_t, ids, mask, self.slots.contexts)
        self.scorer.start(rows_t, ids, mask)

    def observation(self) -> dict[str, np.ndarray]:
        """The context of every slot, right-aligned (left-padded) in a window of ``context_length``; in episodes
        of several turns also ``agent_mask``, 1 on the tokens the agent wrote."""
        observation = {"input_ids": self.slots.input_ids.copy(), "attention_mask": self.slots.attention_mask.copy()}
        if self.multi_turn:
            observation["agent_mask"] = self.slots.agent_mask.copy()
        return observation

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, actions, logprobs=None, active: np.ndarray | None = None) -> StepResult:
        """Advance every slot that has not ended (and is ``active``) by its action.

        Other slots ignore their action, earn 0 and keep their state.
        """
        actions = self.check_actions(actions)
        live = ~self.done if active is None else ~self.done & active
        actions_t, live_t = torch.as_tensor(actions, device=self.device), torch.as_tensor(live, device=self.device)
        logprobs, source = self._policy_logprobs(logprobs, actions_t, live_t)
        ref_logprobs = token_logprobs(self.reference.last, actions_t, self.config.temperature)
        non_score, kl = non_score_reward(ref_logprobs, logprobs, self.kl_coef)

        self.slots.append(actions, live)
        ends = self.turns.step(actions, live)
        responses = {row: self.slots.response_text(row) for row in np.flatnonzero(ends.ended)}
        terms, scored = self._score(actions_t, live_t, ends, responses)
        self._advance_caches(actions_t, live, ends)

        rewards = torch.where(live_t, non_score + terms, torch.zeros_like(non_score))
        nan = torch.full_like(non_score, float("nan"))
        infos = {
            "ref_logprob": torch.where(live_t, ref_logprobs, nan),
            "logprob": nan if logprobs is None else torch.where(live_t, logprobs, nan),
            "kl": nan if kl is None else torch.where(live_t, kl, nan),
            "non_score_reward": torch.where(live_t, non_score, torch.zeros_like(non_score)),
            **scored,
        }
        if self.multi_turn:
            infos["turn_reward"] = torch.as_tensor(ends.turn_reward, device=self.device, dtype=torch.float32)
            rewards = rewards + torch.nan_to_num(infos["turn_reward"])
        return StepResult(
            rewards.cpu().numpy().astype(np.float64),
            ends.terminated,
            ends.truncated,
            self._host_infos(infos, live, source, ends, responses),
        )

    def _score(
        self, tokens: Tensor, live: Tensor, ends: Ends, responses: dict[int, str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This step's score terms (N,), and the infos of the score: ``score``, each paying term's raw value
        (``reward/<name>``) and the step reward."""
        ended = torch.as_tensor(ends.ended, device=self.device)
        turn_ended = ended | torch.as_tensor(~np.isnan(ends.turn_reward), device=self.device)
        terms, score = self.scorer.step(tokens, live, ended, turn_ended)
        self._check_scores(terms, score, live, ended)
        cut_off = torch.as_tensor(ends.cut_off, device=self.device)
        terms = missing_eos_terms(terms, cut_off, self.config.missing_eos_penalty)
        paid = {REWARD_MODEL_TERM: score} if self.reward_model is not None else {}
        if self.reward_fns:
            rows = np.flatnonzero(ends.ended)
            paid |= function_terms(self.reward_fns, self.slots, rows, [responses[r] for r in rows], self.device)
            weighted = weighted_sum(self.reward_fns, paid)
            terms, score = terms + weighted, score + weighted
        scored = {"score": score, **{REWARD_PREFIX + name: value for name, value in paid.items()}}
        if self.step_reward_fn is not None:
            scored["step_reward"] = step_rewards(self.step_reward_fn, self.slots, ends.live, self.device)
            terms = terms + torch.nan_to_num(scored["step_reward"])
        overflow = live & ~torch.isfinite(terms)  # each part fits float32 (checked), their sum may not
        if overflow.any():
            row = int(overflow.nonzero()[0, 0])
            parts = {key: float(value[row]) for key, value in scored.items() if not torch.isnan(value[row])}
            raise ValueError(
                f"slot {row}'s score terms {parts} add up beyond float32's range, where rewards are computed; lower "
                "the reward functions' weights or values"
            )
        return terms, scored

    def _advance_caches(self, tokens: Tensor, live: np.ndarray, ends: Ends) -> None:
        """Every KV cache takes this step's tokens of the episodes that go on, then the environment's replies."""
        continuing = torch.as_tensor(live & ~ends.ended, device=self.device)
        if continuing.any():
            for stepper in self.steppers:
                stepper.advance(tokens, continuing)
        for row, ids in ends.replies.items():
            self.slots.append_reply(row, ids)
        if ends.replies:
            for stepper in self.steppers:
                stepper.extend(ends.replies)
        waited = ~live & ~self.done  # rows that sat this step out and go on (restarted ones, on NEXT_STEP)
        self.done |= ends.ended
        if waited.any() or ends.replies:  # replies: the rows without one waited while they were appended
            self._rebuild_windowed_caches()

    def _rebuild_windowed_caches(self) -> None:
        """Caches that cannot be edited in place (sliding windows) are recomputed from every slot's tokens: the
        masked column of a row that waited would otherwise take a real token's place in its window."""
        stale = [stepper for _, stepper in self.named_steppers() if not stepper.editable]
        if stale:
            contexts = self.slots.contexts()
            for stepper in stale:
                stepper.rebuild(contexts)

    def _host_infos(
        self, infos: dict[str, Tensor], live: np.ndarray, source: str, ends: Ends, responses: dict[int, str]
    ) -> dict[str, np.ndarray]:
        """The step's infos as host arrays (N,): floats, the KL source, the response of each ended episode and,
        in episodes of several turns, the environment's tokens."""
        host = {key: value.cpu().numpy().astype(np.float64) for key, value in infos.items()}
        if self.multi_turn:
            replies = [ends.replies.get(r, []) for r in range(self.num_slots)]
            host["env_tokens"] = np.array([*replies, None], dtype=object)[:-1]  # one list per slot
        host["kl_source"] = np.array([source if alive else "" for alive in live], dtype=object)
        host["response"] = np.array([responses.get(r) for r in range(self.num_slots)], dtype=object)
        return host

    def check_actions(self, actions) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.shape != (self.num_slots,):
            raise ValueError(
                f"expected {self.num_slots} actions (one token id per slot), got an array of shape {actions.shape}"
            )
        if not np.issubdtype(actions.dtype, np.integer):
            raise TypeError(f"actions must be integer token ids, got dtype {actions.dtype}")
        bad = (actions < 0) | (actions >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"action {int(actions[bad][0])} is not a token id: the action space is Discrete({self.vocab_size}), "
                f"ids 0..{self.vocab_size - 1}"
            )
        return actions.astype(np.int64)

    def check_logprobs(self, logprobs) -> Tensor:
        logprobs = as_float_tensor(
            logprobs,
            self.device,
            f"logprobs passed to step() must be numbers: the log-probability of each chosen token, shape "
            f"({self.num_slots},)",
        )
        if logprobs.shape != (self.num_slots,):
            raise ValueError(
                f"logprobs must hold one log-probability per slot, shape ({self.num_slots},), the log-prob of each "
                f"chosen token; got shape {tuple(logprobs.shape)}"
            )
        return logprobs

    def _policy_logprobs(self, logprobs, actions: Tensor, live: Tensor) -> tuple[Tensor | None, str]:
        """The acting policy's log-probs of ``actions`` and where they came from: the caller, the env's policy,
        or nowhere (``reference_only``)."""
        if logprobs is not None:
            return check_logprob_values(self.check_logprobs(logprobs), live, "logprobs passed to step()"), "caller"
        if self.policy is not None:
            return token_logprobs(self.policy.last, actions, self.config.temperature), "policy"
        if self.policy_fn is None:
            return None, "reference_only"
        expected = f"log-probabilities of shape ({self.num_slots}, {self.vocab_size}) (slots, vocabulary)"
        table = as_float_tensor(
            self.policy_fn(self.observation()),
            self.device,
            f"the policy callable {getattr(self.policy_fn, '__name__', type(self.policy_fn).__name__)!r} must "
            f"return {expected}, a tensor or array of numbers",
        )
        if table.shape != (self.num_slots, self.vocab_size):
            raise ValueError(
                f"the policy callable must return log-probabilities of shape ({self.num_slots}, {self.vocab_size}) "
                f"(slots, vocabulary); it returned {tuple(table.shape)}"
            )
        chosen = table.gather(-1, actions[:, None])[:, 0]
        return check_logprob_values(chosen, live, "the policy callable's log-probs of the chosen tokens"), "policy"

    def _check_scores(self, terms: Tensor, score: Tensor, live: Tensor, ended: Tensor) -> None:
        """A NaN or infinite score is an error of the reward model, never a reward."""
        bad = (live & ~torch.isfinite(terms)) | (ended & ~torch.isfinite(score))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            value = float(score[row]) if ended[row] else float(terms[row])
            raise ValueError(
                f"the reward model scored slot {row}'s text {self.render_row(row)!r} as {value}; "
                "a reward must be finite: check the reward model (its dtype, its inputs) before training on it"
            )

    # ---------------------------------------------------------------- views
    def sequence(self, row: int) -> list[int]:
        """Prompt + response so far of slot ``row``, as token ids."""
        return self.slots.sequence(row)

    def prompt_text(self, row: int) -> str:
        return self.slots.prompt_text(row)

    def render_row(self, row: int) -> str:
        """The decoded context of slot ``row``: prompt, then response so far (special tokens shown)."""
        return self.tokenizer.decode(self.slots.sequence(row))
