"""The batched core of TokenRLHF-v0: N token-generation episodes stepped together.

Both public envs are thin views of this class (``TokenGenerationEnv`` holds one
slot, ``TokenGenerationVectorEnv`` N), so the dynamics are written once.

Per slot the core keeps the prompt, the response so far and the observation
window. Per frozen model it keeps one KV cache shared by all slots
(``CachedModel``): a step runs one forward over the N new tokens, never the whole
context. A slot that starts a new prompt while others go on has its row of every
cache recomputed and left-padded to the cache's current length; leading cache
positions that no slot attends to any more are dropped, so the cache stays no
longer than the longest live context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from textenv.models import pad_batch, pooling_at_last_position, position_ids_from_mask, sequence_scores
from textenv.rewards import clip_score, non_score_reward, score_terms, token_logprobs


class CachedModel:
    """A frozen model stepped over N slots with one KV cache.

    ``last`` holds each slot's output at its latest position: next-token logits
    (N, V) for a causal LM, the score (N,) for a sequence-classification model.
    """

    def __init__(self, model: torch.nn.Module, num_slots: int, pad_token_id: int, scores: bool = False):
        self.model, self.num_slots, self.pad_token_id, self.scores = model, num_slots, pad_token_id, scores
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask: Tensor | None = None  # (N, C) which cache positions are real tokens
        self.position = torch.zeros(num_slots, dtype=torch.long, device=self.device)  # next position id
        self.last: Tensor | None = None

    def _output(self, out) -> Tensor:
        if self.scores:
            if out.logits.shape[-1] != 1:
                raise ValueError(
                    f"the reward model must output one scalar per sequence, but gives {out.logits.shape[-1]}; "
                    "load it with AutoModelForSequenceClassification and num_labels=1"
                )
            return out.logits[:, 0].float()
        return out.logits[:, -1].float()

    def _forward(self, **inputs):
        if self.scores:
            with pooling_at_last_position(self.model):
                return self.model(**inputs, use_cache=True)
        return self.model(**inputs, use_cache=True)

    @torch.no_grad()
    def start(self, rows: Tensor, prompts: list[list[int]]) -> None:
        """Run ``prompts`` and make them the contexts of slots ``rows`` (the others keep theirs)."""
        ids, mask = (t.to(self.device) for t in pad_batch(prompts, self.pad_token_id, side="left"))
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        if self.cache is None or len(rows) == self.num_slots:
            if len(rows) != self.num_slots:
                raise RuntimeError("the first start of a CachedModel must cover every slot")
            order = torch.argsort(rows)
            self.cache = out.past_key_values
            if not torch.equal(order, torch.arange(len(rows), device=rows.device)):
                self.cache.reorder_cache(order.to(self.device))
            self.mask, self.last = mask[order], self._output(out)[order]
            self.position = mask[order].sum(-1)
            return
        self._pad_cache_left(ids.shape[1] - self.mask.shape[1])
        width, length = self.mask.shape[1], ids.shape[1]
        for layer, new in zip(self.cache.layers, out.past_key_values.layers):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[rows] = 0
                tensor[rows, :, width - length :] = getattr(new, name)
        self.mask[rows] = 0
        self.mask[rows, width - length :] = mask
        self.position[rows] = mask.sum(-1)
        self.last[rows] = self._output(out)
        self._trim()

    @torch.no_grad()
    def advance(self, tokens: Tensor, live: Tensor) -> None:
        """Append ``tokens`` (N,) to every slot; slots not ``live`` (N,) get a masked pad instead."""
        tokens = torch.where(live, tokens, self.pad_token_id)
        self.mask = torch.cat([self.mask, live.long()[:, None]], dim=1)
        out = self._forward(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.position[:, None],
            past_key_values=self.cache,
        )
        self.cache = out.past_key_values
        keep = live if self.scores else live[:, None]
        self.last = torch.where(keep, self._output(out), self.last)  # a slot that waited keeps its last output
        self.position = self.position + live.long()
        self._trim()

    def _pad_cache_left(self, extra: int) -> None:
        if extra <= 0:
            return
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                padding = tensor.new_zeros(*tensor.shape[:2], extra, tensor.shape[3])
                setattr(layer, name, torch.cat([padding, tensor], dim=2))
        self.mask = torch.cat([self.mask.new_zeros(self.num_slots, extra), self.mask], dim=1)

    def _trim(self) -> None:
        """Drop leading cache positions that no slot attends to."""
        if self.mask[:, 0].any():
            return
        first = int(self.mask.any(0).long().argmax())
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self.mask = self.mask[:, first:]


@dataclass
class StepResult:
    """What one core step produced, per slot (arrays of shape (N,))."""

    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: dict[str, np.ndarray]


class TokenBatchCore:
    """N slots of prompt + response, a frozen reference and reward model, and the reward of each step."""

    def __init__(
        self,
        num_slots: int,
        tokenizer: PreTrainedTokenizerBase,
        reference_model: torch.nn.Module,
        reward_model: torch.nn.Module,
        prompts: Sequence[str],
        prompt_ids: list[list[int]],
        max_prompt_tokens: int,
        max_new_tokens: int,
        kl_coef: float,
        reward_mode: str,
        score_clip: float | None,
        missing_eos_penalty: float | None,
        temperature: float,
        policy: torch.nn.Module | Callable | None,
        vocab_size: int,
    ):
        self.num_slots, self.tokenizer = num_slots, tokenizer
        self.prompts, self.prompt_ids = list(prompts), prompt_ids
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.kl_coef, self.reward_mode, self.temperature = kl_coef, reward_mode, temperature
        self.score_clip, self.missing_eos_penalty = score_clip, missing_eos_penalty
        self.vocab_size, self.eos_token_id, self.pad_token_id = (
            vocab_size,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        self.reward_model = reward_model
        self.reference = CachedModel(reference_model, num_slots, self.pad_token_id)
        self.device = self.reference.device
        # a module is stepped as a causal LM with its own KV cache; any other callable is called on observations
        is_module = isinstance(policy, torch.nn.Module)
        self.policy = CachedModel(policy, num_slots, self.pad_token_id) if is_module else None
        self.policy_fn = None if is_module else policy
        self.dense = (
            CachedModel(reward_model, num_slots, self.pad_token_id, scores=True) if reward_mode == "dense" else None
        )
        self.context_length = max_prompt_tokens + max_new_tokens
        self.input_ids = np.full((num_slots, self.context_length), self.pad_token_id, dtype=np.int64)
        self.attention_mask = np.zeros((num_slots, self.context_length), dtype=np.int64)
        self.prompt_index = np.zeros(num_slots, dtype=np.int64)
        self.responses: list[list[int]] = [[] for _ in range(num_slots)]
        self.done = np.ones(num_slots, dtype=bool)  # every slot needs a reset first
        self.prompt_score = torch.zeros(num_slots, device=self.device)

    # ---------------------------------------------------------------- reset
    def reset(self, rows: np.ndarray, prompt_index: np.ndarray) -> None:
        """Start slots ``rows`` on prompts ``prompt_index`` (both (K,), K <= N)."""
        prompts = [self.prompt_ids[i] for i in prompt_index]
        rows_t = torch.as_tensor(rows, device=self.device)
        for model in (self.reference, self.policy, self.dense):
            if model is not None:
                model.start(rows_t, prompts)
        if self.dense is not None:
            self.prompt_score[rows_t] = clip_score(self.dense.last[rows_t], self.score_clip)
        for row, index, ids in zip(rows, prompt_index, prompts):
            self.prompt_index[row] = index
            self.responses[row] = []
            self.done[row] = False
            self.input_ids[row] = self.pad_token_id
            self.attention_mask[row] = 0
            self.input_ids[row, -len(ids) :] = ids
            self.attention_mask[row, -len(ids) :] = 1

    def observation(self) -> dict[str, np.ndarray]:
        """The context of every slot, right-aligned (left-padded) in a window of ``context_length``."""
        return {"input_ids": self.input_ids.copy(), "attention_mask": self.attention_mask.copy()}

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

    @torch.no_grad()
    def _policy_logprobs(self, actions_t: Tensor) -> Tensor:
        if self.policy is not None:
            return token_logprobs(self.policy.last, actions_t, self.temperature)
        table = torch.as_tensor(self.policy_fn(self.observation()), device=self.device, dtype=torch.float32)
        if table.shape != (self.num_slots, self.vocab_size):
            raise ValueError(
                f"the policy callable must return log-probabilities of shape ({self.num_slots}, {self.vocab_size}) "
                f"(slots, vocabulary); it returned {tuple(table.shape)}"
            )
        return table.gather(-1, actions_t[:, None])[:, 0]

    @torch.no_grad()
    def step(self, actions, logprobs=None, active: np.ndarray | None = None) -> StepResult:
        """Advance every slot that has not ended (and is ``active``) by its action.

        Other slots ignore their action, earn 0 and keep their state.
        """
        actions = self.check_actions(actions)
        live = ~self.done if active is None else ~self.done & active
        if logprobs is not None:
            lp, source = self.check_logprobs(logprobs), "caller"
        elif self.policy is not None or self.policy_fn is not None:
            lp, source = None, "policy"
        else:
            lp, source = None, "reference_only"
        actions_t = torch.as_tensor(actions, device=self.device)
        live_t = torch.as_tensor(live, device=self.device)
        if source == "policy":
            lp = self._policy_logprobs(actions_t)
        ref_lp = token_logprobs(self.reference.last, actions_t, self.temperature)
        non_score, kl = non_score_reward(ref_lp, lp, self.kl_coef)

        for row in np.flatnonzero(live):
            self.responses[row].append(int(actions[row]))
        # the window slides left by one token on live rows; the action enters at the right
        self.input_ids[live, :-1], self.input_ids[live, -1] = self.input_ids[live, 1:], actions[live]
        self.attention_mask[live, :-1], self.attention_mask[live, -1] = self.attention_mask[live, 1:], 1
        lengths = np.array([len(r) for r in self.responses])
        terminated = live & (actions == self.eos_token_id)
        truncated = live & ~terminated & (lengths >= self.max_new_tokens)
        ended = terminated | truncated
        ended_t, truncated_t = (
            torch.as_tensor(ended, device=self.device),
            torch.as_tensor(truncated, device=self.device),
        )

        score = torch.full((self.num_slots,), float("nan"), device=self.device)
        if self.dense is not None:
            self.dense.advance(actions_t, live_t)
            current = clip_score(self.dense.last, self.score_clip)
            terms = score_terms(current, ended_t, truncated_t, self.missing_eos_penalty, previous=self.prompt_score)
            score = torch.where(ended_t, self.dense.last, score)
            self.prompt_score = torch.where(live_t, current, self.prompt_score)
        else:
            if ended.any():
                rows = np.flatnonzero(ended)
                sequences = [self.prompt_ids[self.prompt_index[r]] + self.responses[r] for r in rows]
                ids, mask = (t.to(self.device) for t in pad_batch(sequences, self.pad_token_id))
                score[torch.as_tensor(rows, device=self.device)] = sequence_scores(self.reward_model, ids, mask)
            terms = score_terms(
                clip_score(torch.nan_to_num(score), self.score_clip), ended_t, truncated_t, self.missing_eos_penalty
            )

        continuing = live_t & ~ended_t
        if continuing.any():
            for model in (self.reference, self.policy):
                if model is not None:
                    model.advance(actions_t, continuing)
        self.done |= ended

        zero = torch.zeros_like(non_score)
        rewards = torch.where(live_t, non_score + terms, zero)
        nan = torch.full_like(non_score, float("nan"))
        infos = {
            "ref_logprob": torch.where(live_t, ref_lp, nan),
            "logprob": nan if lp is None else torch.where(live_t, lp, nan),
            "kl": nan if kl is None else torch.where(live_t, kl, nan),
            "non_score_reward": torch.where(live_t, non_score, zero),
            "score": score,
        }
        infos = {key: value.cpu().numpy().astype(np.float64) for key, value in infos.items()}
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
        return self.tokenizer.decode(self.prompt_ids[self.prompt_index[row]] + self.responses[row])
