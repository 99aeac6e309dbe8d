"""The live state of an interaction's episodes (a game, a session), found again from each ``Turn``.

An interaction is one object for every slot of an env, and ``Turn`` names no episode: it
holds the episode's context. So ``OpenEpisodes`` files each episode's state under its
context at the end of the agent's turn (``keep``) and finds it at the next turn as the
longest filed context that begins the new turn's context (``take``): that context plus
the reply the env appended is what came before the new turn. Episodes whose contexts are
equal token for token are interchangeable (same prompt, same actions, same replies), so
which of their states a slot gets changes nothing it could observe.

An episode that never comes back (truncated, or its slot reset) stays filed until
``max_open`` states are filed; then the oldest is closed and dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from textenv.turns import Turn


class OpenEpisodes:
    """States of open episodes keyed by their context; ``close(state)`` runs on each one dropped."""

    def __init__(self, max_open: int = 1024, close: Callable[[object], None] | None = None):
        if isinstance(max_open, bool) or not isinstance(max_open, int) or max_open < 1:
            raise ValueError(f"max_open must be an int >= 1, got {max_open!r}")
        self.max_open, self.close = max_open, close
        self.filed: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.count = 0

    def keep(self, turn: Turn, state) -> None:
        """File ``state`` under the context that ends with ``turn``'s tokens."""
        self.filed.setdefault(tuple(turn.context_ids), []).append(state)
        self.count += 1
        while self.count > self.max_open:
            key, states = next(iter(self.filed.items()))
            self._drop(key, states)

    def take(self, turn: Turn, what: str):
        """The state of the episode whose turn ``turn`` is (not its first turn), unfiled; ``what`` names the
        interaction in the error when none is filed."""
        before = turn.context_ids[: len(turn.context_ids) - len(turn.turn_ids)]
        for length in sorted({len(key) for key in self.filed}, reverse=True):
            key = tuple(before[:length])
            if length <= len(before) and key in self.filed:
                states = self.filed[key]
                state = states.pop()
                self.count -= 1
                if not states:
                    del self.filed[key]
                return state
        raise LookupError(
            f"{what}: no open episode for turn {turn.index} of prompt {turn.prompt[:60]!r}: its state was closed "
            f"(more than max_open={self.max_open} episodes open at once: raise max_open) or never opened here"
        )

    def close_all(self) -> None:
        while self.filed:
            key, states = next(iter(self.filed.items()))
            self._drop(key, states)

    def _drop(self, key, states: list) -> None:
        state = states.pop(0)
        self.count -= 1
        if not states:
            del self.filed[key]
        if self.close is not None:
            self.close(state)

    def __len__(self) -> int:
        return self.count
