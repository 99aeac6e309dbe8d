"""TextArena games as an ``interaction`` of TokenRLHF-v0: the agent plays one seat of a game.

    from textenv.adapters import no_score
    from textenv.adapters.textarena import TextArenaGame
    game = TextArenaGame("TicTacToe-v0", opponent="random")
    env = gym.make("TokenRLHF-v0", prompts=game.rows(range(100)), interaction=game, reward_fns={"none": no_score},
                   reference_model=..., tokenizer=..., max_new_tokens=8, max_turns=5, max_env_tokens=500)

How TextArena's concepts map onto the env:

- an episode is one game, reset with the row's ``seed``; the prompt is the game's
  opening observation for the agent's seat (``rows(seeds)`` builds them), so the first
  turn already knows the rules and the board;
- the agent's turn text (decoded, special tokens skipped) is its action,
  ``env.step(turn_text)``;
- the reply is every message the game sent the agent's seat since its last action
  (the game's messages, the opponent's moves, the board), each ``[SENDER] message`` on a
  line of its own after a newline, as TextArena's LLM observation wrapper writes them,
  less the echo of the agent's own action (already in the context); it is appended as text;
- the game's final reward for the agent's seat (``env.close()``) pays on the agent's last
  token (``Reply(done=True, reward=...)``); a game still running after ``max_turns`` agent
  turns is truncated and pays nothing;
- other seats are played by a fixed ``opponent``: ``"random"`` (a move drawn from those the
  observation lists as available, e.g. ``Available Moves: '[0]', '[4]'``), ``"first"`` (the
  first such move: scripted and deterministic), or a callable ``(observation_text) ->
  action``.

A game is run on the raw TextArena env (its ``-raw`` registration: TextArena's observation
wrappers would repeat the whole history in every reply). Each episode draws the game's
randomness from a random state of its own, seeded by the row's seed (TextArena reseeds
Python's global ``random`` on reset): an episode is determined by its seed, the agent's
moves and the opponent's, and the process's ``random`` is left as it was.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from textenv.adapters import require
from textenv.adapters.episodes import OpenEpisodes
from textenv.turns import Reply, Turn

OPPONENTS = ("random", "first")
LISTED_MOVES = re.compile(r"\[[^\[\]\n]+\]")  # '[4]', '[bet]', '[0 3]'


def listed_moves(observation: str) -> list[str]:
    """The moves listed after 'available' or 'valid moves' on the last line that has them, e.g. ``['[0]', '[4]']``
    (what precedes the word, such as the ``[GAME]`` sender tag, is not a move)."""
    for line in reversed(observation.splitlines()):
        found = re.search(r"available|valid moves", line, re.IGNORECASE)
        moves = LISTED_MOVES.findall(line[found.end() :]) if found else []
        if moves:
            return moves
    return []


@dataclass
class Game:
    """One episode's game: the TextArena env, its random state, and the opponent's."""

    env: object
    random_state: tuple
    opponent_rng: random.Random


class TextArenaGame:
    """A TextArena game as an interaction (``textenv.turns.Interaction``); the agent plays seat ``player_id``.

    ``game``: a TextArena env id (its ``-raw`` registration is used) or a callable that returns a new raw env.
    ``num_players``: 1 for a single-player game, else the seats (default: 1 without an opponent, 2 with one).
    ``env_kwargs``: passed to ``textarena.make`` (a game's options). ``max_open``: games kept open at once.
    """

    def __init__(
        self,
        game: str | Callable[[], object],
        *,
        opponent: str | Callable[[str], str] | None = None,
        num_players: int | None = None,
        player_id: int = 0,
        env_kwargs: dict | None = None,
        max_open: int = 1024,
    ):
        if not (isinstance(game, str) or callable(game)):
            raise TypeError(f"game must be a TextArena env id or a callable that makes a raw env, got {game!r}")
        if not (opponent is None or opponent in OPPONENTS or callable(opponent)):
            raise ValueError(f"opponent must be one of {OPPONENTS}, a callable (observation) -> action, or None")
        num_players = (1 if opponent is None else 2) if num_players is None else num_players
        if isinstance(num_players, bool) or not isinstance(num_players, int) or num_players < 1:
            raise ValueError(f"num_players must be an int >= 1, got {num_players!r}")
        if num_players > 1 and opponent is None:
            raise ValueError(f"a game of {num_players} players needs opponent= ('random', 'first' or a callable)")
        if not (isinstance(player_id, int) and 0 <= player_id < num_players):
            raise ValueError(f"player_id must be a seat in 0..{num_players - 1}, got {player_id!r}")
        self.game, self.opponent, self.num_players, self.player_id = game, opponent, num_players, player_id
        self.env_kwargs = dict(env_kwargs or {})
        self.episodes = OpenEpisodes(max_open)

    def __getstate__(self) -> dict:  # open games stay with the process that plays them
        return self.__dict__ | {"episodes": OpenEpisodes(self.episodes.max_open)}

    @property
    def name(self) -> str:
        return f"TextArenaGame({self.game if isinstance(self.game, str) else getattr(self.game, '__name__', 'game')})"

    def rows(self, seeds: Iterable[int]) -> list[dict]:
        """Prompt rows, one game per seed: ``{"prompt": opening, "seed": seed, "opening": opening}``."""
        rows = []
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seeds must be ints >= 0, got {seed!r}")
            _, opening = self.start(seed)
            rows.append({"prompt": opening, "seed": seed, "opening": opening})
        return rows

    def start(self, seed: int) -> tuple[Game, str]:
        """A new game reset with ``seed``, the opponent moved up to the agent's turn; and its opening text."""
        env = self.make_env()
        game = Game(env, random.Random(seed).getstate(), random.Random(seed))
        self.run(game, lambda: env.reset(num_players=self.num_players, seed=seed))
        done, text = self.play_opponent(game)
        if done:
            raise ValueError(f"{self.name} ended before the agent's first turn (seed {seed})")
        return game, text

    def respond(self, turn: Turn) -> Reply:
        if turn.index == 0:
            game, opening = self.start(self.seed_of(turn))
            if opening != turn.row.get("opening"):
                raise ValueError(
                    f"{self.name}: the game of seed {turn.row.get('seed')} opens with {opening[:80]!r}, not with the "
                    "row's 'opening'; build the prompts with rows(seeds) of this game and opponent (a callable "
                    "opponent must be deterministic)"
                )
        else:
            game = self.episodes.take(turn, self.name)
        done, _ = self.run(game, lambda: game.env.step(turn.turn_text))
        done, text = self.play_opponent(game) if not done else (True, "")
        if done:
            return Reply(done=True, reward=self.final_reward(game))
        self.episodes.keep(turn, game)
        return Reply(text="\n" + text)

    def seed_of(self, turn: Turn) -> int:
        seed = turn.row.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{self.name}: the prompt's row has no int 'seed' ({turn.row!r}); build it with rows()")
        return seed

    def play_opponent(self, game: Game) -> tuple[bool, str]:
        """Let the opponent move until it is the agent's turn or the game is over; then the agent's new messages
        (every message sent to its seat since its last action, the opponent's moves among them)."""
        while True:
            seat, messages = self.run(game, game.env.get_observation)
            if seat == self.player_id:
                return False, self.format(game, messages, seat)
            move = self.opponent_move(game, self.format(game, messages, seat))
            done, _ = self.run(game, partial(game.env.step, move))
            if done:
                return True, ""

    def opponent_move(self, game: Game, observation: str) -> str:
        if callable(self.opponent):
            move = self.opponent(observation)
            if not isinstance(move, str):
                raise TypeError(f"{self.name}: the opponent returned {move!r}; it must return the action's text")
            return move
        moves = listed_moves(observation)
        if not moves:
            raise ValueError(
                f"{self.name}: opponent={self.opponent!r} found no listed moves (a line with 'available' and "
                f"'[move]' items) in its observation {observation[-120:]!r}; pass a callable opponent"
            )
        return moves[0] if self.opponent == "first" else game.opponent_rng.choice(moves)

    def format(self, game: Game, messages, seat: int) -> str:
        """``[SENDER] message`` lines of the messages to ``seat``, its own actions left out."""
        if isinstance(messages, str):
            raise TypeError(f"{self.name}: the game's observation is text, not messages: pass a raw env (id-raw)")
        roles = game.env.state.role_mapping
        lines = []
        for sender, message, _ in messages:
            if sender == seat:
                continue
            lines.append(f"[{'GAME' if sender < 0 else roles.get(sender, f'Player {sender}')}] {message}")
        return "\n".join(lines)

    def final_reward(self, game: Game) -> float:
        closed = self.run(game, game.env.close)
        rewards = closed[0] if isinstance(closed, tuple) else closed
        if not isinstance(rewards, dict) or self.player_id not in rewards:
            raise ValueError(f"{self.name}: the game ended without a reward for seat {self.player_id}: {closed!r}")
        return float(rewards[self.player_id])

    def run(self, game: Game, call: Callable):
        """``call()`` with the episode's random state as Python's global one; the process's is restored."""
        outside = random.getstate()
        random.setstate(game.random_state)
        try:
            return call()
        finally:
            game.random_state = random.getstate()
            random.setstate(outside)

    def make_env(self):
        if callable(self.game):
            return self.game()
        textarena = require("textarena", "textarena")
        game_id = self.game if self.game.endswith("-raw") else f"{self.game}-raw"
        if game_id not in textarena.envs.registration.ENV_REGISTRY:
            raise ValueError(f"TextArena has no game {self.game!r} (textarena.envs.registration.ENV_REGISTRY)")
        return textarena.make(game_id, **self.env_kwargs)
