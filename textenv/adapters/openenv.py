"""OpenEnv environments as an ``interaction`` of TokenRLHF-v0, in-process or over their WebSocket client.

    from textenv.adapters import no_score
    from textenv.adapters.openenv import OpenEnvInteraction
    remote = OpenEnvInteraction(base_url="http://127.0.0.1:8000")              # a running server
    local = OpenEnvInteraction(env=MyEnvironment, action_cls=MyAction)  # the same env, in this process
    env = gym.make("TokenRLHF-v0", prompts=remote.rows(range(100)), interaction=remote,
                   reward_fns={"none": no_score}, reference_model=..., tokenizer=..., ...)

How OpenEnv's concepts map onto the env:

- an episode is one OpenEnv session: in-process a new environment from ``env`` (a class or
  factory), over the network a WebSocket session (``GenericEnvClient(base_url).sync()``):
  in openenv-core 0.3 the HTTP ``/reset`` and ``/step`` routes build a fresh environment
  per request, so only a session keeps an episode's state from one step to the next;
- the session is reset with the row's ``seed`` (and ``reset_kwargs``); the prompt is the
  reset observation's text (``rows(seeds)`` builds the rows, and the first turn checks
  that the reset gave that text again: the environment must honour its seed). Prompts of
  your own (rows without ``"opening"``) are not checked, and the reset observation is not
  shown to the agent;
- the agent's turn text (decoded, special tokens skipped) becomes the typed action:
  ``action`` is a field name, or a callable ``(text) -> dict`` (in-process it may return
  the Action itself); by default the text goes to the action's one required text field,
  read from the action class's schema (in-process) or the server's ``/schema``;
- the observation's text is the reply, appended exactly as the environment wrote it:
  ``observation`` is a field name, or a callable ``(observation dict) -> str``; by default
  the observation's one text field;
- each step's reward pays on the agent's last token of the turn (``Reply.reward``; a
  reward of None pays 0); ``done`` ends the episode (terminated) and nothing is appended.

What the server sends is checked, not trusted: an error it reports, a message it does not
answer within ``timeout_s``, a closed connection, or a payload without an observation
object, a boolean ``done`` and a numeric (or null) ``reward`` raises ``OpenEnvError``
naming the server and what was wrong; the step raises with it, so that episode is never
paid. The session is closed then, and whenever an episode ends.
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import urllib.request
from collections.abc import Callable, Iterable

from textenv.adapters import require
from textenv.adapters.episodes import OpenEpisodes
from textenv.turns import Reply, Turn


class OpenEnvError(RuntimeError):
    """An OpenEnv environment or server failed a reset or a step, or sent something that is not a step result."""


def check_result(payload, where: str) -> tuple[dict, float, bool]:
    """``(observation, reward, done)`` of a step result ``{"observation": {...}, "reward": x|None, "done": bool}``."""
    if not isinstance(payload, dict):
        raise OpenEnvError(f"{where} sent {payload!r}, not a step result object")
    observation, reward, done = payload.get("observation"), payload.get("reward"), payload.get("done")
    if not isinstance(observation, dict):
        raise OpenEnvError(f"{where} sent a step result whose observation is {observation!r}, not an object")
    if not isinstance(done, bool):
        raise OpenEnvError(f"{where} sent a step result whose done is {done!r}, not true or false")
    if reward is not None and (
        isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward)
    ):
        raise OpenEnvError(f"{where} sent a step result whose reward is {reward!r}, not a finite number or null")
    return observation, 0.0 if reward is None else float(reward), done


def text_field(schema: dict, what: str, required_only: bool) -> str:
    """The one text field of a JSON schema (``metadata`` aside); none or several raises, naming them."""
    properties = {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}
    candidates = [k for k in properties if not required_only or k in schema.get("required", [])]
    texts = [k for k in candidates if properties[k].get("type") == "string"]
    if len(texts) != 1:
        raise ValueError(
            f"the {what} has {len(texts)} text fields {texts} (fields {sorted(properties)}); name the one to use "
            f"with {'action' if what.startswith('action') else 'observation'}= (a field name or a callable)"
        )
    return texts[0]


class InProcessSession:
    """One episode's environment, made in this process: results serialized as the server would send them."""

    def __init__(self, make: Callable[[], object], action_cls, where: str):
        self.env, self.action_cls, self.where = make(), action_cls, where
        self.serialize = require("openenv.core.env_server.serialization", "openenv").serialize_observation

    def reset(self, **kwargs) -> dict:
        return self.serialize(self.env.reset(**kwargs))

    def step(self, action) -> dict:
        if isinstance(action, dict):
            action = self.action_cls.model_validate(action)
        return self.serialize(self.env.step(action))

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


class ClientSession:
    """One episode's WebSocket session with a server; what it sends is returned raw, to be checked."""

    def __init__(self, base_url: str, timeout_s: float, connect_timeout_s: float):
        generic = require("openenv.core.generic_client", "openenv")

        class RawClient(generic.GenericEnvClient):
            def _parse_result(self, payload):  # the payload as sent: check_result reads it, nothing defaulted
                return payload

        self.client = RawClient(base_url=base_url, connect_timeout_s=connect_timeout_s, message_timeout_s=timeout_s)
        self.client = self.client.sync()
        self.client.connect()

    def reset(self, **kwargs) -> dict:
        return self.client.reset(**kwargs)

    def step(self, action) -> dict:
        return self.client.step(action if isinstance(action, dict) else action.model_dump())

    def close(self) -> None:
        self.client.close()


class OpenEnvInteraction:
    """An OpenEnv environment as an interaction (``textenv.turns.Interaction``): give ``env`` (in-process, with
    ``action_cls`` unless ``action`` is a callable that returns Action objects) or ``base_url`` (a server)."""

    def __init__(
        self,
        env: Callable[[], object] | None = None,
        *,
        base_url: str | None = None,
        action_cls: type | None = None,
        action: str | Callable[[str], object] | None = None,
        observation: str | Callable[[dict], str] | None = None,
        reset_kwargs: dict | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        max_open: int = 1024,
    ):
        if (env is None) == (base_url is None):
            raise ValueError("give env= (an OpenEnv Environment class or factory) or base_url= (a server), one")
        if env is not None and not callable(env):
            raise TypeError(f"env must be an Environment class or a factory that makes one, got {env!r}")
        if env is not None and action_cls is None and not callable(action):
            raise ValueError("in-process, pass action_cls= (the environment's Action class) or a callable action=")
        for name, value in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        for name, value in (("action", action), ("observation", observation)):
            if not (value is None or isinstance(value, str) or callable(value)):
                raise TypeError(f"{name} must be a field name, a callable or None, got {value!r}")
        self.env, self.base_url, self.action_cls = env, base_url, action_cls
        self.action, self.observation = action, observation
        self.reset_kwargs = dict(reset_kwargs or {})
        self.timeout_s, self.connect_timeout_s = float(timeout_s), float(connect_timeout_s)
        self.episodes = OpenEpisodes(max_open, close=self.close_session)
        self.action_field: str | None = action if isinstance(action, str) else None

    def __getstate__(self) -> dict:  # open sessions stay with the process that holds them
        return self.__dict__ | {"episodes": OpenEpisodes(self.episodes.max_open, close=self.close_session)}

    @property
    def where(self) -> str:
        return f"the OpenEnv server at {self.base_url}" if self.base_url else f"the OpenEnv environment {self.env!r}"

    def rows(self, seeds: Iterable[int]) -> list[dict]:
        """Prompt rows, one per seed: ``{"prompt": reset text, "seed": seed, "opening": reset text}``."""
        rows = []
        for seed in seeds:
            session, opening = self.start(seed)
            self.close_session(session)
            rows.append({"prompt": opening, "seed": seed, "opening": opening})
        return rows

    def start(self, seed: int | None):
        """A new session, reset (with ``seed`` unless None); and the reset observation's text."""
        session = self.call(self.open_session, "connect")
        kwargs = self.reset_kwargs | ({} if seed is None else {"seed": seed})
        try:
            observation, _, done = check_result(self.call(lambda: session.reset(**kwargs), "reset"), self.where)
            if done:
                raise OpenEnvError(f"{self.where} ended the episode at its reset ({kwargs})")
            return session, self.text_of(observation)
        except Exception:
            self.close_session(session)  # a failed episode keeps no session open
            raise

    def respond(self, turn: Turn) -> Reply:
        if turn.index == 0:
            session, opening = self.start(turn.row.get("seed"))
        else:
            session = self.episodes.take(turn, f"OpenEnvInteraction({self.where})")
        try:
            if turn.index == 0 and "opening" in turn.row and opening != turn.row["opening"]:
                raise OpenEnvError(
                    f"{self.where} reset with seed {turn.row.get('seed')} to {opening[:80]!r}, not to the row's "
                    "opening: the environment must give the same reset for the same seed (build rows with rows())"
                )
            action = self.to_action(turn.turn_text)
            payload = self.call(lambda: session.step(action), f"step {turn.turn_text[:40]!r}")
            observation, reward, done = check_result(payload, self.where)
            text = None if done else self.text_of(observation)
        except Exception:
            self.close_session(session)  # a failed episode keeps no session open, and is not paid
            raise
        if done:
            self.close_session(session)
            return Reply(done=True, reward=reward)
        self.episodes.keep(turn, session)
        return Reply(text=text, reward=reward)

    def to_action(self, text: str):
        if callable(self.action):
            return self.action(text)
        if self.action_field is None:
            self.action_field = text_field(self.action_schema(), "action schema", required_only=True)
        return {self.action_field: text}

    def action_schema(self) -> dict:
        if self.base_url is None:
            return self.action_cls.model_json_schema()
        try:
            with urllib.request.urlopen(f"{self.base_url.rstrip('/')}/schema", timeout=self.timeout_s) as answer:
                return json.loads(answer.read())["action"]
        except (OSError, ValueError, KeyError) as error:
            raise OpenEnvError(
                f"{self.where}: could not read the action schema from /schema ({error}); pass action="
            ) from error

    def text_of(self, observation: dict) -> str:
        if callable(self.observation):
            text = self.observation(observation)
        else:
            field = self.observation
            if field is None:
                schema = {k: {"type": "string" if isinstance(v, str) else "other"} for k, v in observation.items()}
                field = text_field({"properties": schema}, "observation", required_only=False)
            if field not in observation:
                raise OpenEnvError(f"{self.where} sent an observation without {field!r}: {sorted(observation)}")
            text = observation[field]
        if not isinstance(text, str):
            raise OpenEnvError(f"{self.where}: the observation's text is {text!r}, not a string")
        return text

    def open_session(self):
        if self.base_url is None:
            return InProcessSession(self.env, self.action_cls, self.where)
        return ClientSession(self.base_url, self.timeout_s, self.connect_timeout_s)

    def call(self, call: Callable, what: str):
        """``call()``; a failure raises ``OpenEnvError`` saying what failed and where."""
        try:
            return call()
        except Exception as error:  # the environment's or the connection's: re-raised below, named
            if isinstance(error, TimeoutError | asyncio.TimeoutError):
                timeout = f"timeout_s={self.timeout_s}"
                raise OpenEnvError(f"{self.where} did not answer the {what} within {timeout}") from None
            raise OpenEnvError(f"{self.where} failed the {what}: {type(error).__name__}: {error}") from error

    def close_session(self, session) -> None:
        session.close()  # the client's close is best effort: a connection already gone closes quietly

    def close(self) -> None:
        """Close every open session (episodes still running lose theirs)."""
        self.episodes.close_all()
