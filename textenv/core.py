"""The batched core of TokenRLHF-v0: N token-generation episodes stepped together.

Both public envs are thin views of this class (``TokenGenerationEnv`` holds one
slot, ``TokenGenerationVectorEnv`` N), so the dynamics are written once.

Per slot the core keeps the prompt, the response so far and the observation
window. Per frozen model it keeps one KV cache shared by all slots
(``textenv.lm.CachedStepper``): a step runs one forward over the N new tokens,
never the whole context. A slot that starts a new prompt while others go on has
its row of every cache recomputed and left-padded to the cache's current length.

The score part of the reward comes from a scorer: ``SparseScorer`` (the reward
model reads each finished episode once) or ``DenseScorer`` (it steps with the
episodes and pays the change of score of every prefix).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from textenv.config import TokenEnvConfig
from textenv.info import REWARD_PREFIX, slot_info
from textenv.lm import CachedStepper, pad_batch, sequence_scores, token_logprobs
from textenv.loading import Task
from textenv.reward_fns import REWARD_MODEL_TERM
from textenv.rewards import clip_score, non_score_reward, score_terms
from textenv.turns import Turns

LOGPROB_TOLERANCE = 1e-4  # log_softmax can round a little above 0 (bf16); a probability is far above


Contexts = Callable[[], list[list[int]]]


def start_rows(stepper: CachedStepper, num_slots: int, rows: Tensor, ids: Tensor, mask: Tensor, contexts: Contexts):
    """Start ``rows`` of ``stepper`` on the left-padded prompts ``ids`` (K, W); all rows at the first start.

    ``contexts()`` gives every slot's tokens (new prompts included), for caches rebuilt whole.
    """
    if stepper.cache is None or len(rows) == num_slots:
        if len(rows) != num_slots:
            raise RuntimeError("the first start of a stepper must cover every slot")
        order = torch.argsort(rows.cpu())
        stepper.prefill(ids[order], mask[order])
    else:
        stepper.start_rows(rows, ids, mask, contexts)


class SparseScorer:
    """The reward model reads prompt + response once, on the step the episode ends."""

    def __init__(self, reward_model: torch.nn.Module, pad_token_id: int, config: TokenEnvConfig):
        self.reward_model, self.pad_token_id, self.config = reward_model, pad_token_id, config

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor, contexts: Contexts) -> None:
        """Nothing to do: no prefix is scored."""

    def step(
        self, tokens: Tensor, live: Tensor, ended: Tensor, truncated: Tensor, sequence: Callable[[int], list[int]]
    ) -> tuple[Tensor, Tensor]:
        """(score term of this step's reward, raw score where an episode ended and NaN elsewhere), each (N,)."""
        score = torch.full(tokens.shape, float("nan"), device=tokens.device)
        rows = ended.nonzero()[:, 0]
        if len(rows):
            ids, mask = (
                t.to(tokens.device) for t in pad_batch([sequence(r) for r in rows.tolist()], self.pad_token_id)
            )
            score[rows] = sequence_scores(self.reward_model, ids, mask)
        clipped = clip_score(torch.where(ended, score, 0.0), self.config.score_clip)
        return score_terms(clipped, ended, truncated, self.config.missing_eos_penalty), score


class NoModelScorer:
    """No reward model: the score is the reward functions' alone (0 here), the missing-EOS penalty still applies."""

    def __init__(self, config: TokenEnvConfig):
        self.config = config

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor, contexts: Contexts) -> None:
        """Nothing to do: no prefix is scored."""

    def step(
        self, tokens: Tensor, live: Tensor, ended: Tensor, truncated: Tensor, sequence: Callable[[int], list[int]]
    ) -> tuple[Tensor, Tensor]:
        zero = torch.zeros(tokens.shape, device=tokens.device)
        score = torch.where(ended, zero, torch.full_like(zero, float("nan")))
        return score_terms(zero, ended, truncated, self.config.missing_eos_penalty), score


class DenseScorer:
    """The reward model steps with the episodes (its own KV cache) and pays each prefix's change of score."""

    def __init__(self, reward_model: torch.nn.Module, pad_token_id: int, config: TokenEnvConfig, num_slots: int):
        self.stepper = CachedStepper(reward_model, pad_token_id, scores=True)
        self.config, self.num_slots = config, num_slots
        self.previous = torch.zeros(num_slots, device=self.stepper.device)  # clipped score of each slot's prefix

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor, contexts: Contexts) -> None:
        start_rows(self.stepper, self.num_slots, rows, ids, mask, contexts)
        self.previous[rows] = clip_score(self.stepper.last[rows], self.config.score_clip)

    def step(
        self, tokens: Tensor, live: Tensor, ended: Tensor, truncated: Tensor, sequence: Callable[[int], list[int]]
    ) -> tuple[Tensor, Tensor]:
        current = self.stepper.advance(tokens, live)
        clipped = clip_score(current, self.config.score_clip)
        terms = score_terms(clipped, ended, truncated, self.config.missing_eos_penalty, previous=self.previous)
        self.previous = torch.where(live, clipped, self.previous)
        return terms, torch.where(ended, current, torch.full_like(current, float("nan")))


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


class TextScorer:
    """A reward model with its own tokenizer reads text: the prompt as given, then the decoded response.

    Re-tokenized with the reward model's tokenizer (its own special tokens added as it
    adds them) and scored by a plain forward: sparse on the step an episode ends, dense
    on every step for every live episode (no KV cache: the tokens of a growing text
    need not extend the previous tokens).
    """

    def __init__(self, reward_model, reward_tokenizer, config: TokenEnvConfig, num_slots: int, text, device):
        self.reward_model, self.reward_tokenizer, self.config, self.text = reward_model, reward_tokenizer, config, text
        self.dense = config.reward_mode == "dense"
        self.previous = torch.zeros(num_slots, device=device)

    def scores(self, rows: Tensor) -> Tensor:
        """The reward model's score of each row's text, (K,)."""
        texts = [self.text(row) for row in rows.tolist()]
        encoded = [self.reward_tokenizer(text)["input_ids"] for text in texts]
        pad = self.reward_tokenizer.pad_token_id if self.reward_tokenizer.pad_token_id is not None else 0
        ids, mask = (t.to(rows.device) for t in pad_batch(encoded, pad))
        return sequence_scores(self.reward_model, ids, mask)

    def start(self, rows: Tensor, ids: Tensor, mask: Tensor, contexts: Contexts) -> None:
        if self.dense:
            self.previous[rows] = clip_score(self.scores(rows), self.config.score_clip)

    def step(
        self, tokens: Tensor, live: Tensor, ended: Tensor, truncated: Tensor, sequence: Callable[[int], list[int]]
    ) -> tuple[Tensor, Tensor]:
        score = torch.full(tokens.shape, float("nan"), device=tokens.device)
        rows = (live if self.dense else ended).nonzero()[:, 0]
        if len(rows):
            score[rows] = self.scores(rows)
        if not self.dense:
            clipped = clip_score(torch.where(ended, score, 0.0), self.config.score_clip)
            return score_terms(clipped, ended, truncated, self.config.missing_eos_penalty), score
        current = torch.where(live, clip_score(score, self.config.score_clip), self.previous)
        terms = score_terms(current, ended, truncated, self.config.missing_eos_penalty, previous=self.previous)
        self.previous = current
        return terms, torch.where(ended, score, torch.full_like(score, float("nan")))


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
        self.reward_model, self.vocab_size = task.reward_model, task.vocab_size
        self.eos_token_id, self.pad_token_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.kl_coef = config.kl_coef
        self.reference = CachedStepper(task.reference_model, self.pad_token_id)
        self.device = self.reference.device
        # a module is stepped as a causal LM with its own KV cache; any other callable is called on observations
        is_module = isinstance(config.policy, torch.nn.Module)
        self.policy = CachedStepper(config.policy, self.pad_token_id) if is_module else None
        self.policy_fn = None if is_module else config.policy
        self.rows, self.reward_fns, self.step_reward_fn = task.rows, task.reward_fns, task.step_reward_fn
        self.accuracy = task.accuracy  # the reward function that checks answers, where the task has one
        if task.reward_model is None:
            self.scorer = NoModelScorer(config)
        elif task.reward_tokenizer is not None:
            self.conversations = task.conversations or [None] * len(self.prompts)
            self.scorer = TextScorer(
                self.reward_model, task.reward_tokenizer, config, num_slots, self.reward_text, self.device
            )
        elif config.reward_mode == "dense":
            self.scorer = DenseScorer(self.reward_model, self.pad_token_id, config, num_slots)
        else:
            self.scorer = SparseScorer(self.reward_model, self.pad_token_id, config)
        for name, stepper in self.named_steppers():
            stepper.check_cache(self.eos_token_id, name)
        self.context_length = task.context_length or config.context_length
        self.input_ids = np.full((num_slots, self.context_length), self.pad_token_id, dtype=np.int64)
        self.attention_mask = np.zeros((num_slots, self.context_length), dtype=np.int64)
        self.prompt_index = np.zeros(num_slots, dtype=np.int64)
        self.responses: list[list[int]] = [[] for _ in range(num_slots)]  # every token after the prompt
        self.done = np.ones(num_slots, dtype=bool)  # every slot needs a reset first
        self.turns = Turns(task, config, self.tokenizer, num_slots) if task.interaction is not None else None

    @property
    def steppers(self) -> list[CachedStepper]:
        """The causal LMs stepped with the context: the reference and, if given as a module, the policy."""
        return [self.reference] if self.policy is None else [self.reference, self.policy]

    def _rebuild_windowed_caches(self) -> None:
        """Caches that cannot be edited in place (sliding windows) are recomputed from every slot's tokens: the
        masked column of a row that waited would otherwise take a real token's place in its window."""
        stale = [stepper for _, stepper in self.named_steppers() if not stepper.editable]
        if stale:
            contexts = [self.sequence(row) for row in range(self.num_slots)]
            for stepper in stale:
                stepper.rebuild(contexts)

    def named_steppers(self) -> list[tuple[str, CachedStepper]]:
        """Every model the core steps with a KV cache, with the name of its argument."""
        named = [("reference model", self.reference), ("policy", self.policy)]
        if isinstance(self.scorer, DenseScorer):
            named.append(("reward model", self.scorer.stepper))
        return [(name, stepper) for name, stepper in named if stepper is not None]

    # ---------------------------------------------------------------- reset
    def reset(self, rows: np.ndarray, prompt_index: np.ndarray) -> None:
        """Start slots ``rows`` on prompts ``prompt_index`` (both (K,), K <= N)."""
        prompts = [self.prompt_ids[i] for i in prompt_index]
        for row, index, prompt in zip(rows, prompt_index, prompts):
            self.prompt_index[row] = index
            self.responses[row] = []
            if self.turns is not None:
                self.turns.reset(row)
            self.done[row] = False
            self.input_ids[row] = self.pad_token_id
            self.attention_mask[row] = 0
            self.input_ids[row, -len(prompt) :] = prompt
            self.attention_mask[row, -len(prompt) :] = 1
        rows_t = torch.as_tensor(rows, device=self.device)
        ids, mask = pad_batch(prompts, self.pad_token_id, side="left")
        contexts = lambda: [self.sequence(row) for row in range(self.num_slots)]  # noqa: E731
        for stepper in self.steppers:
            start_rows(stepper, self.num_slots, rows_t, ids, mask, contexts)
        self.scorer.start(rows_t, ids, mask, contexts)

    def observation(self) -> dict[str, np.ndarray]:
        """The context of every slot, right-aligned (left-padded) in a window of ``context_length``; with an
        interaction also ``agent_mask``, 1 on the tokens the agent wrote."""
        observation = {"input_ids": self.input_ids.copy(), "attention_mask": self.attention_mask.copy()}
        if self.turns is not None:
            observation["agent_mask"] = self.turns.agent_mask.copy()
        return observation

    # ---------------------------------------------------------------- step
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
        logprobs = torch.as_tensor(logprobs, device=self.device, dtype=torch.float32)
        if logprobs.shape != (self.num_slots,):
            raise ValueError(
                f"logprobs must hold one log-probability per slot, shape ({self.num_slots},), the log-prob of each "
                f"chosen token; got shape {tuple(logprobs.shape)}"
            )
        return logprobs

    def _policy_logprobs(self, logprobs, actions: Tensor, live: Tensor) -> tuple[Tensor | None, str]:
        """The acting policy's log-probs of ``actions`` and where they came from (see DESIGN.md's KL sources)."""
        if logprobs is not None:
            return check_logprob_values(self.check_logprobs(logprobs), live, "logprobs passed to step()"), "caller"
        if self.policy is not None:
            return token_logprobs(self.policy.last, actions, self.config.temperature), "policy"
        if self.policy_fn is None:
            return None, "reference_only"
        table = torch.as_tensor(self.policy_fn(self.observation()), device=self.device, dtype=torch.float32)
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
                f"the reward model scored slot {row}'s text {self.tokenizer.decode(self.sequence(row))!r} as {value}; "
                "a reward must be finite: check the reward model (its dtype, its inputs) before training on it"
            )

    def _function_terms(self, ended: np.ndarray) -> dict[str, Tensor]:
        """Each reward function's raw value for the episodes that ended this step (NaN elsewhere), (N,) each."""
        rows = np.flatnonzero(ended)
        values = {fn.name: torch.full((self.num_slots,), float("nan"), device=self.device) for fn in self.reward_fns}
        if len(rows):
            prompts = [self.prompt_text(r) for r in rows]
            responses = [self.response_text(r) for r in rows]
            ids = [list(self.responses[r]) for r in rows]
            data = [self.rows[self.prompt_index[r]] for r in rows]
            rows_t = torch.as_tensor(rows, device=self.device)
            for fn in self.reward_fns:
                values[fn.name][rows_t] = torch.as_tensor(fn(prompts, responses, ids, data), dtype=torch.float32)
        return values

    def _step_rewards(self, live: np.ndarray) -> Tensor | None:
        """The step reward function's value for each live slot's newest token (NaN elsewhere), or None."""
        if self.step_reward_fn is None:
            return None
        rows = np.flatnonzero(live)
        values = torch.full((self.num_slots,), float("nan"), device=self.device)
        if len(rows):
            prompts = [self.prompt_text(r) for r in rows]
            data = [self.rows[self.prompt_index[r]] for r in rows]
            found = self.step_reward_fn(prompts, [list(self.responses[r]) for r in rows], data)
            values[torch.as_tensor(rows, device=self.device)] = torch.as_tensor(found, dtype=torch.float32)
        return values

    def _append(self, actions: np.ndarray, live: np.ndarray) -> None:
        """Append each live slot's action to its response; the window slides left by one token on live rows."""
        for row in np.flatnonzero(live):
            self.responses[row].append(int(actions[row]))
        self.input_ids[live, :-1], self.input_ids[live, -1] = self.input_ids[live, 1:], actions[live]
        self.attention_mask[live, :-1], self.attention_mask[live, -1] = self.attention_mask[live, 1:], 1
        if self.turns is not None:
            mask = self.turns.agent_mask
            mask[live, :-1], mask[live, -1] = mask[live, 1:], 1

    def _append_replies(self, replies: dict[int, list[int]]) -> None:
        """Append each reply's tokens to its slot's context and to every KV cache (``CachedStepper.extend``)."""
        for row, ids in replies.items():
            self.responses[row].extend(ids)
            self.turns.append_context(self, row, ids)
        for stepper in self.steppers:
            stepper.extend(replies)

    def response_text(self, row: int) -> str:
        """The response so far, decoded without special tokens. It is decoded after its prompt, so that a
        word-initial space (which many tokenizers drop when decoding a continuation alone) is kept."""
        prompt = self.prompt_ids[self.prompt_index[row]]
        head = self.tokenizer.decode(prompt, skip_special_tokens=True)
        whole = self.tokenizer.decode(prompt + self.responses[row], skip_special_tokens=True)
        return whole[len(head) :] if whole.startswith(head) else self.tokenizer.decode(self.responses[row])

    def reward_text(self, row: int) -> str:
        """What a reward model with its own tokenizer reads: the conversation in that tokenizer's chat template
        when the prompt is a conversation and it has one, else the prompt text as given and the response."""
        messages = self.conversations[self.prompt_index[row]]
        reward_tokenizer = self.scorer.reward_tokenizer
        if messages is not None and reward_tokenizer.chat_template:
            reply = {"role": "assistant", "content": self.response_text(row).strip()}
            return reward_tokenizer.apply_chat_template([*messages, reply], tokenize=False)
        return self.prompt_text(row) + self.response_text(row)

    def sequence(self, row: int) -> list[int]:
        """Prompt + response so far of slot ``row``, as token ids."""
        return self.prompt_ids[self.prompt_index[row]] + self.responses[row]

    @torch.no_grad()
    def step(self, actions, logprobs=None, active: np.ndarray | None = None) -> StepResult:
        """Advance every slot that has not ended (and is ``active``) by its action.

        Other slots ignore their action, earn 0 and keep their state.
        """
        actions = self.check_actions(actions)
        live = ~self.done if active is None else ~self.done & active
        actions_t, live_t = torch.as_tensor(actions, device=self.device), torch.as_tensor(live, device=self.device)
        lp, source = self._policy_logprobs(logprobs, actions_t, live_t)
        ref_lp = token_logprobs(self.reference.last, actions_t, self.config.temperature)
        non_score, kl = non_score_reward(ref_lp, lp, self.kl_coef)

        self._append(actions, live)
        if self.turns is None:
            lengths = np.array([len(r) for r in self.responses])
            terminated = live & (actions == self.eos_token_id)
            truncated = live & ~terminated & (lengths >= self.config.max_new_tokens)
            replies, turn_reward = {}, None
        else:
            terminated, truncated, replies, turn_reward = self.turns.step(self, actions, live)
        ended = terminated | truncated
        ended_t, truncated_t = (
            torch.as_tensor(ended, device=self.device),
            torch.as_tensor(truncated, device=self.device),
        )
        terms, score = self.scorer.step(actions_t, live_t, ended_t, truncated_t, self.sequence)
        self._check_scores(terms, score, live_t, ended_t)
        paid = {REWARD_MODEL_TERM: score} if self.reward_model is not None else {}
        if self.reward_fns:
            paid |= self._function_terms(ended)
            weighted = sum(fn.weight * torch.nan_to_num(paid[fn.name]) for fn in self.reward_fns)
            terms, score = terms + weighted, score + weighted
        step_reward = self._step_rewards(live)
        if step_reward is not None:
            terms = terms + torch.nan_to_num(step_reward)

        continuing = live_t & ~ended_t
        if continuing.any():
            for stepper in self.steppers:
                stepper.advance(actions_t, continuing)
        if replies:
            self._append_replies(replies)
        waited = ~live & ~self.done  # rows that sat this step out and go on (restarted ones, on NEXT_STEP)
        self.done |= ended
        if waited.any() or replies:  # replies: the rows without one waited while they were appended
            self._rebuild_windowed_caches()

        zero, nan = torch.zeros_like(non_score), torch.full_like(non_score, float("nan"))
        rewards = torch.where(live_t, non_score + terms, zero)
        if turn_reward is not None:
            turn_reward = torch.as_tensor(turn_reward, device=self.device, dtype=torch.float32)
            rewards = rewards + torch.nan_to_num(turn_reward)
        infos = {
            "ref_logprob": torch.where(live_t, ref_lp, nan),
            "logprob": nan if lp is None else torch.where(live_t, lp, nan),
            "kl": nan if kl is None else torch.where(live_t, kl, nan),
            "non_score_reward": torch.where(live_t, non_score, zero),
            "score": score,
            **{REWARD_PREFIX + name: value for name, value in paid.items()},
        }
        if step_reward is not None:
            infos["step_reward"] = step_reward
        if turn_reward is not None:
            infos["turn_reward"] = turn_reward
        infos = {key: value.cpu().numpy().astype(np.float64) for key, value in infos.items()}
        if self.turns is not None:
            infos["env_tokens"] = np.array([replies.get(r, []) for r in range(self.num_slots)] + [None], object)[:-1]
        infos["kl_source"] = np.array([source if alive else "" for alive in live], dtype=object)
        infos["response"] = np.array(
            [
                self.tokenizer.decode(self.responses[r], skip_special_tokens=True) if ended[r] else None
                for r in range(self.num_slots)
            ],
            dtype=object,
        )
        return StepResult(rewards.cpu().numpy().astype(np.float64), terminated, truncated, infos)

    # ---------------------------------------------------------------- views
    def prompt_text(self, row: int) -> str:
        return self.prompts[self.prompt_index[row]]

    def render_row(self, row: int) -> str:
        """The decoded context of slot ``row``: prompt, then response so far (special tokens shown)."""
        return self.tokenizer.decode(self.sequence(row))
