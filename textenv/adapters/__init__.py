"""Adapters that bring other libraries' environments into TokenRLHF-v0, each an optional extra.

- ``textenv.adapters.reasoning_gym``: reasoning-gym's procedural datasets as tasks,
  ``task="reasoning_gym:NAME"``; the question is the prompt, the entry's answer and
  metadata the data row, the dataset's ``score_answer`` the reward function
  (``pip install "textenv[reasoning-gym]"``).
- ``textenv.adapters.textarena``: a TextArena game as an ``interaction``: the agent's
  turn is the game action, the game's new messages are the reply, its final reward
  pays; a fixed opponent plays the other seats (``pip install "textenv[textarena]"``).
- ``textenv.adapters.openenv``: an OpenEnv environment, in-process or over its
  WebSocket client, as an ``interaction``: the turn becomes the typed action, the
  observation's text the reply, each step's reward pays (``pip install "textenv[openenv]"``).

Each module imports its library only when one of its adapters is built or used, so
``import textenv`` and importing these modules never load an extra. docs/adapters.md
says how to use each, which tasks and games run offline, and what is left out.
"""

from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import ``module`` (an extra's library), or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed (needed by textenv.adapters): pip install 'textenv[{extra}]' ({error})"
        ) from error


def no_score(**kwargs) -> float:
    """A reward function that pays nothing. An interaction whose replies pay (a game's final reward, an
    environment's step rewards) needs no other score, but the env takes its task's reward model unless some reward
    function is given: pass ``reward_fns={"none": no_score}`` (``--reward-fn textenv.adapters:no_score``)."""
    return 0.0
