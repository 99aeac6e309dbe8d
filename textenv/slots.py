"""The token state of N episodes: each slot's prompt, every token after it, and its observation window.

``Slots`` is the one buffer the core, the turn machinery, the scorers and the
reward functions read; only the core writes it (``start``, ``append``,
``append_reply``). A slot's tokens after its prompt are its *response*: the
agent's tokens and, in episodes of several turns, the environment's replies.
The window is right-aligned: the newest token is always at ``input_ids[:, -1]``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np


class Slots:
    """Per slot: which prompt, the tokens after it, and the window (``input_ids``, ``attention_mask``,
    ``agent_mask``) of ``context_length`` tokens."""

    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        prompt_ids: Sequence[list[int]],
        rows: Sequence[dict],
        num_slots: int,
        context_length: int,
    ):
        self.tokenizer, self.prompts, self.prompt_ids, self.rows = tokenizer, prompts, prompt_ids, rows
        self.num_slots, self.context_length = num_slots, context_length
        self.pad_token_id = tokenizer.pad_token_id
        self.prompt_index = np.zeros(num_slots, dtype=np.int64)
        self.responses: list[list[int]] = [[] for _ in range(num_slots)]  # every token after the prompt
        self.lengths = np.zeros(num_slots, dtype=np.int64)  # len(responses[row])
        self.input_ids = np.full((num_slots, context_length), self.pad_token_id, dtype=np.int64)
        self.attention_mask = np.zeros((num_slots, context_length), dtype=np.int64)
        self.agent_mask = np.zeros((num_slots, context_length), dtype=np.int64)  # 1: the agent wrote it

    def start(self, row: int, index: int) -> None:
        """Slot ``row`` starts on prompt ``index``: its window holds the prompt alone."""
        prompt = self.prompt_ids[index]
        self.prompt_index[row] = index
        self.responses[row], self.lengths[row] = [], 0
        self.input_ids[row], self.attention_mask[row], self.agent_mask[row] = self.pad_token_id, 0, 0
        self.input_ids[row, -len(prompt) :] = prompt
        self.attention_mask[row, -len(prompt) :] = 1

    def append(self, tokens: np.ndarray, live: np.ndarray) -> None:
        """Append each ``live`` slot's token (the agent's): its window slides left by one."""
        for row in np.flatnonzero(live):
            self.responses[row].append(int(tokens[row]))
        self.lengths += live
        for window, value in ((self.input_ids, tokens[live]), (self.attention_mask, 1), (self.agent_mask, 1)):
            window[live, :-1] = window[live, 1:]
            window[live, -1] = value

    def append_reply(self, row: int, ids: list[int]) -> None:
        """Append the environment's tokens ``ids`` to slot ``row`` (``agent_mask`` 0 on them)."""
        k = len(ids)
        if k == 0:
            return
        self.responses[row].extend(ids)
        self.lengths[row] += k
        for window, values in ((self.input_ids, ids), (self.attention_mask, 1), (self.agent_mask, 0)):
            window[row, :-k] = window[row, k:].copy()
            window[row, -k:] = values

    # ---------------------------------------------------------------- reading
    def sequence(self, row: int) -> list[int]:
        """Prompt + response so far of slot ``row``, as token ids."""
        return self.prompt_ids[self.prompt_index[row]] + self.responses[row]

    def contexts(self) -> list[list[int]]:
        """Every slot's tokens, for KV caches rebuilt whole."""
        return [self.sequence(row) for row in range(self.num_slots)]

    def prompt_text(self, row: int) -> str:
        return self.prompts[self.prompt_index[row]]

    def row(self, row: int) -> dict:
        """The prompt's other data columns, a deep copy: a reward function or interaction that edits it, or a list
        in it, changes nothing here, for this episode's other readers nor for later episodes."""
        return copy.deepcopy(self.rows[self.prompt_index[row]])

    def response_text(self, row: int) -> str:
        """The response so far, decoded without special tokens: what reward functions read and ``info["response"]``
        reports. It is decoded after its prompt, so that a word-initial space (which many tokenizers drop when
        decoding a continuation alone) is kept."""
        prompt = self.prompt_ids[self.prompt_index[row]]
        head = self.tokenizer.decode(prompt, skip_special_tokens=True)
        whole = self.tokenizer.decode(prompt + self.responses[row], skip_special_tokens=True)
        if whole.startswith(head):
            return whole[len(head) :]
        return self.tokenizer.decode(self.responses[row], skip_special_tokens=True)
