"""Episodes of several turns: the agent writes, the environment answers, the agent writes again.

An ``interaction`` object (``TokenEnvConfig.interaction``) has one method::

    def respond(self, turn: Turn) -> Reply: ...

The env calls it whenever the agent ends a turn: it emits an end-of-turn token
(``end_of_turn_token``, EOS by default) or its turn's text ends with one of
``stop_strings``. ``Turn`` holds the conversation so far; the ``Reply`` says what
the environment appends (a tool's output, a user's reply, feedback), as text or
as exact token ids, with an optional reward for this turn, or that the episode is
over (``done``).

What the env does with a reply:

- its tokens join the context exactly (no retokenisation of what came before) and
  every KV cache the env holds (reference, policy); they are not actions: no KL
  term, no step of their own, and the observation's ``agent_mask`` is 0 on them;
- its ``reward`` is added to the reward of the step that ended the turn (the
  agent's last token of the turn); ``info["turn_reward"]`` reports it there;
- ``info["env_tokens"]`` on that step lists the appended token ids, so a learner
  can feed them to its own KV cache.

Limits: ``max_new_tokens`` is per agent turn, ``max_turns`` counts agent turns,
``max_env_tokens`` bounds one reply. A turn that reaches ``max_new_tokens`` without
ending, or a reply after the last allowed turn, truncates the episode (a limit
outside the task); ``Reply(done=True)`` terminates it. Only the first of these, a
turn cut off before its end, pays ``missing_eos_penalty``. A reply longer than
``max_env_tokens`` is an error that names the interaction.

A single-turn episode is the case of ``SingleTurn``, whose answer to the agent's
first turn is ``done``: the env runs every episode through ``Turns``, so there is
one end-of-episode path.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from textenv.reward_fns import describe_number, fits_float32
from textenv.slots import Slots
from textenv.text import encode_text


@dataclass(frozen=True)
class Turn:
    """What the interaction sees when the agent ends a turn."""

    prompt: str
    """The prompt's text."""
    row: dict
    """The prompt's other data columns ({} when it has none)."""
    context_ids: list[int]
    """Every token so far: the prompt, the agent's turns and the environment's replies, this turn last."""
    turn_ids: list[int]
    """The agent's tokens of the turn that just ended (its end-of-turn token included)."""
    turn_text: str
    """``turn_ids`` decoded, special tokens skipped."""
    index: int
    """0 for the agent's first turn, 1 for its second, ..."""
    history: list[tuple[str, str]] = field(default_factory=list)
    """The turns before this one as (speaker, text) pairs, speaker 'agent' or 'env'."""


@dataclass(frozen=True)
class Reply:
    """What the environment answers; with ``done`` the episode is over and nothing is appended."""

    text: str | None = None
    """Appended after the agent's turn, tokenized as text (a control token's text stays text: ``textenv.text``)."""
    token_ids: list[int] | None = None
    """Or exact token ids (e.g. a chat template's control tokens); not both."""
    reward: float = 0.0
    """Added to the reward of the agent's last token of this turn."""
    done: bool = False
    """The episode ends here (terminated)."""


@runtime_checkable
class Interaction(Protocol):
    """The environment's side of a multi-turn episode."""

    def respond(self, turn: Turn) -> Reply: ...


def check_reply(reply, name: str) -> Reply:
    """The interaction's reply, checked; anything else is an error that names the interaction."""
    if not isinstance(reply, Reply):
        raise TypeError(f"interaction {name} returned {reply!r}; respond() must return a textenv.turns.Reply")
    if reply.text is not None and reply.token_ids is not None:
        raise ValueError(f"interaction {name} returned a Reply with both text and token_ids; give one")
    reward = reply.reward.item() if isinstance(reply.reward, np.generic) else reply.reward
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not fits_float32(reward):
        raise ValueError(
            f"interaction {name} returned the turn reward {describe_number(reward)}; it must be a finite number "
            "within float32's range (|reward| <= 3.403e+38)"
        )
    if reply.token_ids is not None and not all(isinstance(t, numbers.Integral) for t in reply.token_ids):
        raise TypeError(f"interaction {name} returned token_ids that are not all ints: {reply.token_ids!r}")
    return reply


class SingleTurn:
    """The interaction of a single-turn episode: the agent's first turn ends it (terminated)."""

    def respond(self, turn: Turn) -> Reply:
        return Reply(done=True)


@dataclass
class Ends:
    """How one step ended episodes and turns, per slot (arrays of shape (N,))."""

    live: np.ndarray
    """The slots that took this step."""
    terminated: np.ndarray
    """The task ended the episode: its last turn ended (EOS, end-of-turn token, stop string) and the interaction
    said ``done``."""
    truncated: np.ndarray
    """A limit outside the task ended it: a turn reached ``max_new_tokens``, or a reply came after the last turn."""
    cut_off: np.ndarray
    """The episode's last turn was cut at ``max_new_tokens`` before it ended: no EOS (or end-of-turn token) was
    written. Only these pay ``missing_eos_penalty``."""
    replies: dict[int, list[int]]
    """The environment's tokens to append, by slot."""
    turn_reward: np.ndarray
    """Each ended turn's reward (NaN where no turn ended)."""

    @property
    def ended(self) -> np.ndarray:
        return self.terminated | self.truncated


class Turns:
    """The turn state of N slots: where each agent turn began and how many have ended.

    ``step`` runs after the core has appended the agent's tokens: it finds the turns
    that ended, asks the interaction, and says which episodes ended and what to append.
    A single-turn episode is the case of ``SingleTurn``, whose reply ends the episode.
    """

    def __init__(self, interaction: Interaction, end_ids: tuple[int, ...], slots: Slots, config, vocab_size: int):
        self.interaction, self.end_ids, self.slots = interaction, np.array(end_ids), slots
        self.name = type(interaction).__name__
        self.tokenizer, self.vocab_size = slots.tokenizer, vocab_size
        self.max_new_tokens, self.max_turns, self.max_env_tokens = (
            config.max_new_tokens,
            config.max_turns,
            config.max_env_tokens,
        )
        self.stop_strings = tuple(config.stop_strings)
        self.turn_start = np.zeros(slots.num_slots, dtype=np.int64)  # index in the response where the turn began
        self.turn_index = np.zeros(slots.num_slots, dtype=np.int64)  # agent turns ended so far
        self.segments: list[list[tuple[str, list[int]]]] = [[] for _ in range(slots.num_slots)]  # earlier turns

    def reset(self, row: int) -> None:
        self.turn_start[row] = self.turn_index[row] = 0
        self.segments[row] = []

    def step(self, actions: np.ndarray, live: np.ndarray) -> Ends:
        """The ends of this step's turns and episodes; ``actions`` are already appended to the live slots."""
        ends_turn = live & np.isin(actions, self.end_ids)
        if self.stop_strings:
            for row in np.flatnonzero(live & ~ends_turn):
                ends_turn[row] = self._text(row).endswith(self.stop_strings)
        cut_off = live & ~ends_turn & (self.slots.lengths - self.turn_start >= self.max_new_tokens)
        ends = Ends(live, np.zeros_like(live), cut_off.copy(), cut_off, {}, np.full(len(live), np.nan))
        for row in np.flatnonzero(ends_turn):
            reply = check_reply(self.interaction.respond(self._turn(row)), self.name)
            ends.turn_reward[row] = reply.reward
            self.segments[row].append(("agent", self.slots.responses[row][self.turn_start[row] :]))
            self.turn_index[row] += 1
            if reply.done:
                ends.terminated[row] = True
            elif self.turn_index[row] >= self.max_turns:
                ends.truncated[row] = True  # the interaction would go on: a limit outside the task ends it
            else:
                ends.replies[row] = self._reply_ids(reply)
                self.segments[row].append(("env", ends.replies[row]))
                self.turn_start[row] = self.slots.lengths[row] + len(ends.replies[row])
        return ends

    def _text(self, row: int) -> str:
        return self.tokenizer.decode(self.slots.responses[row][self.turn_start[row] :], skip_special_tokens=True)

    def _turn(self, row: int) -> Turn:
        ids = self.slots.responses[row][self.turn_start[row] :]
        history = [(who, self.tokenizer.decode(tokens, skip_special_tokens=True)) for who, tokens in self.segments[row]]
        return Turn(
            prompt=self.slots.prompt_text(row),
            row=self.slots.row(row),
            context_ids=self.slots.sequence(row),
            turn_ids=list(ids),
            turn_text=self._text(row),
            index=int(self.turn_index[row]),
            history=history,
        )

    def _reply_ids(self, reply: Reply) -> list[int]:
        if reply.token_ids is not None:
            ids = [int(t) for t in reply.token_ids]
        elif reply.text:
            ids = encode_text(self.tokenizer, reply.text, add_special_tokens=False)
        else:
            ids = []
        if len(ids) > self.max_env_tokens:
            raise ValueError(
                f"interaction {self.name} replied with {len(ids)} tokens, more than max_env_tokens="
                f"{self.max_env_tokens}; raise max_env_tokens or shorten the reply"
            )
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"interaction {self.name} replied with token ids outside 0..{self.vocab_size - 1}: {ids}")
        return ids
