"""Guess The Number (TextArena's ``GuessTheNumber-v0``: 1 to 20, 5 turns) as an interaction the trainer imports.

    python -m agents --interaction guess_the_number:GuessTheNumber ...     (run from this folder)

``GuessTheNumber`` is the adapter with the game's options fixed (the command line instantiates an
interaction with no arguments). The game pays 1 for the number found and, for a game lost, a share
that grows as the last guess nears the number. ``demonstrations`` plays games, half of them with a
player that halves the numbers the hints leave (it always wins) and half with one that guesses at
random, and writes one supervised row per guess: the context so far (the opening, each guess and
each reply, as the env lays them out with ``end_of_turn_token="]"``) and the guess. A policy
fine-tuned on them plays a mixture of the two; RL can move it towards the player that wins.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from functools import partial

from textenv.adapters.textarena import TextArenaGame

GAME, OPTIONS = "GuessTheNumber-v0", {"min_number": 1, "max_number": 20, "max_turns": 5}


class GuessTheNumber(TextArenaGame):
    """One player guesses a number from 1 to 20 in 5 turns, with a hint ('higher', 'lower') after each guess."""

    def __init__(self) -> None:
        super().__init__(GAME, env_kwargs=OPTIONS)


def bisect(low: int, high: int, guess: int, reply: str) -> tuple[int, int]:
    """The numbers still possible after ``guess`` and its hint."""
    return (guess + 1, high) if "higher" in reply else (low, guess - 1) if "lower" in reply else (low, high)


def demonstrations(seeds: Iterable[int], seed: int = 0, bisect_share: float = 0.5) -> list[dict]:
    """One ``{"prompt": context, "response": guess}`` row per guess, one game per seed, each game played by one of
    two players: with probability ``bisect_share`` one that guesses the middle of the numbers the hints leave
    (it always wins), else one that guesses a number it has not guessed yet at random, whatever the hints."""
    player, game = random.Random(seed), GuessTheNumber()
    low, high = OPTIONS["min_number"], OPTIONS["max_number"]
    rows = []
    for game_seed in seeds:
        state, context = game.start(game_seed)
        bisecting, left, unguessed = player.random() < bisect_share, (low, high), list(range(low, high + 1))
        while True:
            number = (left[0] + left[1]) // 2 if bisecting else unguessed.pop(player.randrange(len(unguessed)))
            guess = f"[{number}]"
            rows.append({"prompt": context, "response": guess})
            done, _ = game.run(state, partial(state.env.step, guess))
            done, reply = (True, "") if done else game.play_opponent(state)
            if done:
                break
            left = bisect(*left, number, reply)
            context += guess + "\n" + reply
    return rows
