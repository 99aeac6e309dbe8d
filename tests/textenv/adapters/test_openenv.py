"""textenv/adapters/openenv.py: an OpenEnv environment as an interaction, in-process and over its client.

A real OpenEnv server (openenv-core's app, uvicorn) runs on 127.0.0.1 at a free port with ``Words``, an
environment defined here. In both modes the agent's turn becomes the typed action, the observation's text
enters the context exactly, rewards and done flags arrive as the environment sends them, and the episodes
pass the multi-turn uncached recomputation (``tests/textenv/test_turns.py``). A server that errors, hangs or
sends malformed data raises a clear error from the step, so the episode is never paid.
"""

import json
import socket
import threading
import time

import gymnasium as gym
import pytest

from tests.textenv.adapters.conftest import EOS, Scorer, context_of, play_vector, text_ids
from tests.textenv.test_turns import KL_COEF, check
from textenv.adapters import no_score
from textenv.adapters.openenv import OpenEnvError, OpenEnvInteraction
from textenv.turns import Turn

pytest.importorskip("openenv.core")
uvicorn = pytest.importorskip("uvicorn")
from openenv.core.env_server.http_server import create_app  # noqa: E402
from openenv.core.env_server.interfaces import Environment  # noqa: E402
from openenv.core.env_server.types import Action, Observation, State  # noqa: E402

SETTINGS = dict(max_prompt_tokens=40, max_new_tokens=8, max_turns=4, max_env_tokens=20, kl_coef=KL_COEF)


class WordAction(Action):
    word: str


class WordObservation(Observation):
    text: str = ""
    letters: int = 0


class Words(Environment):
    """Hears three words: replies ' heard WORD;', pays 0.1 per letter each step, done on the third word. The word
    'boom' makes it raise, 'slow' makes it take two seconds."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def reset(self, seed=None, episode_id=None, **kwargs) -> WordObservation:
        self.heard = 0
        return WordObservation(text=f"Say 3 words ({seed}):", done=False, reward=None)

    def step(self, action: WordAction, timeout_s=None, **kwargs) -> WordObservation:
        if action.word == "boom":
            raise ValueError("the environment broke")
        if action.word == "slow":
            time.sleep(2)
        self.heard += 1
        return WordObservation(
            text=f" heard {action.word};", letters=len(action.word), done=self.heard == 3, reward=0.1 * len(action.word)
        )

    @property
    def state(self) -> State:
        return State(step_count=self.heard)


def loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port
    return sock


@pytest.fixture(scope="module")
def server_url():
    app = create_app(Words, WordAction, WordObservation, max_concurrent_envs=16)
    sock = loopback_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(params=["in-process", "client"])
def interaction(request, server_url):
    if request.param == "in-process":
        return OpenEnvInteraction(Words, action_cls=WordAction)
    return OpenEnvInteraction(base_url=server_url, timeout_s=1.0)


def make(tokenizer, lms, interaction, seeds=(0, 1)):
    reference, policy = lms
    return gym.make("TokenRLHF-v0", prompts=interaction.rows(seeds), interaction=interaction,
                    reward_fns={"none": no_score}, reference_model=reference, policy=policy, tokenizer=tokenizer,
                    device="cpu", **SETTINGS)  # fmt: skip


def test_replies_rewards_and_done_arrive_as_the_environment_sends_them(tokenizer, lms, interaction):
    env = make(tokenizer, lms, interaction, seeds=[5])
    observation, info = env.reset(seed=0)
    assert info["prompt"] == "Say 3 words (5):"  # the reset observation's text is the prompt
    beside = Words()  # the same environment, stepped here: what the server must have sent
    beside.reset(seed=5)
    for word in ["ab", "cde", "f"]:
        context = context_of({k: v[None] for k, v in observation.items()}, 0)
        for token in text_ids(tokenizer, word) + [EOS]:
            observation, reward, terminated, truncated, info = env.step(token)
        sent = beside.step(WordAction(word=word))
        assert info["turn_reward"] == pytest.approx(sent.reward) and terminated == sent.done and not truncated
        if not sent.done:
            assert tokenizer.decode(info["env_tokens"]) == sent.text  # appended exactly, nothing added
            turn = text_ids(tokenizer, word) + [EOS]
            new = context_of({k: v[None] for k, v in observation.items()}, 0)
            assert new == context + turn + text_ids(tokenizer, sent.text)
    assert terminated and len(interaction.episodes) == 0  # ended on the third word; the session closed with it


def test_episodes_match_uncached_recomputation(tokenizer, lms, interaction):
    reference, policy = lms
    env = gym.make_vec("TokenRLHF-v0", num_envs=3, vectorization_mode="vector_entry_point",
                       prompts=interaction.rows(range(4)), interaction=interaction, reward_fns={"none": no_score},
                       reference_model=reference, policy=policy, tokenizer=tokenizer, device="cpu",
                       **SETTINGS)  # fmt: skip
    words = ["a", "to", "tea", "word", "no"]
    records = play_vector(env, tokenizer, lambda rng: words[rng.integers(len(words))], steps=60)
    assert len(records) >= 6 and all(not r.truncated for r in records)  # every episode ended on the third word
    check(records, reference, Scorer(), policy=policy)
    interaction.close()


def first_turn(interaction, word: str, row: dict | None = None) -> Turn:
    row = row or interaction.rows([0])[0]
    return Turn(row["opening"], row, [5, 6], [6], word, 0)


@pytest.mark.parametrize(
    ("mode", "word", "message"),
    [
        ("in-process", "boom", "failed the step 'boom': ValueError: the environment broke"),
        ("client", "boom", "failed the step 'boom': RuntimeError: Server error: the environment broke"),
        ("client", "slow", "did not answer the step 'slow' within timeout_s=1.0"),  # in-process has no timeout
    ],
)
def test_an_environment_that_fails_or_hangs_raises_and_pays_nothing(tokenizer, lms, server_url, mode, word, message):
    interaction = (
        OpenEnvInteraction(Words, action_cls=WordAction)
        if mode == "in-process"
        else OpenEnvInteraction(base_url=server_url, timeout_s=1.0)
    )
    env = make(tokenizer, lms, interaction)
    env.reset(seed=0)
    for token in text_ids(tokenizer, word):
        env.step(token)
    with pytest.raises(OpenEnvError, match=message):
        env.step(EOS)  # the step that ends the turn: no reward comes back
    assert len(interaction.episodes) == 0  # the session was closed, not kept


class FakeServer:
    """A WebSocket server on 127.0.0.1 that answers every reset well and every step with ``step_answer``; it
    records the type of each message it receives, per connection (sessions may overlap: one's close can arrive after
    the next one's first messages)."""

    def __init__(self, step_answer: str):
        from websockets.sync.server import serve

        self.sessions: list[list[str]] = []

        def handler(connection):
            received: list[str] = []
            self.sessions.append(received)
            for raw in connection:
                kind = json.loads(raw)["type"]
                received.append(kind)
                if kind == "reset":
                    connection.send(json.dumps({"type": "observation", "data": {
                        "observation": {"text": "Say 3 words (0):"}, "reward": None, "done": False}}))  # fmt: skip
                elif kind == "step":
                    connection.send(step_answer)

        sock = loopback_socket()
        sock.listen()
        self.server = serve(handler, sock=sock)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"

    def close(self):
        self.server.shutdown()
        self.thread.join(10)


def answer(data) -> str:
    return json.dumps({"type": "observation", "data": data})


@pytest.mark.parametrize(
    ("step_answer", "message"),
    [
        (answer({"observation": {"text": "x"}, "reward": "lots", "done": False}), "reward is 'lots', not a finite"),
        (answer({"observation": {"text": "x"}, "reward": 1.0}), "done is None, not true or false"),
        (answer({"observation": "x", "reward": 1.0, "done": False}), "observation is 'x', not an object"),
        (answer({"observation": {"text": "x"}, "reward": float("nan"), "done": False}), "reward is nan"),
        ("not json {", "failed the step 'word': JSONDecodeError"),
        (json.dumps({"type": "error", "data": {"message": "bad"}}), "Server error: bad"),
    ],
)
def test_malformed_answers_are_refused_naming_the_server(step_answer, message):
    server = FakeServer(step_answer)
    try:
        interaction = OpenEnvInteraction(base_url=server.url, action="word", timeout_s=2.0)
        with pytest.raises(OpenEnvError, match=f"{server.url}.*{message}|{message}"):
            interaction.respond(first_turn(interaction, "word"))
        assert len(interaction.episodes) == 0
        deadline = time.monotonic() + 5
        stepped = [session for session in server.sessions if "step" in session]
        while not (stepped and stepped[-1][-1:] == ["close"]) and time.monotonic() < deadline:
            time.sleep(0.02)
            stepped = [session for session in server.sessions if "step" in session]
        assert stepped[-1] == ["reset", "step", "close"]  # the failed episode's session was closed
    finally:
        server.close()


class TwoTexts(Action):
    first: str
    second: str


def test_the_text_field_is_found_or_asked_for(server_url):
    with pytest.raises(ValueError, match=r"2 text fields \['first', 'second'\].*name the one to use with action="):
        OpenEnvInteraction(Words, action_cls=TwoTexts).to_action("hi")
    local = OpenEnvInteraction(Words, action_cls=WordAction, observation=lambda o: f"<{o['letters']}>")
    reply = local.respond(first_turn(local, "four"))
    assert reply.text == "<4>" and reply.reward == pytest.approx(0.4)
    remote = OpenEnvInteraction(base_url=server_url)
    assert remote.to_action("hi") == {"word": "hi"}  # read from the server's /schema
    with pytest.raises(OpenEnvError, match="without 'words'"):
        OpenEnvInteraction(Words, action_cls=WordAction, observation="words").rows([0])


def test_a_reset_that_differs_from_the_prompt_is_refused(interaction):
    with pytest.raises(OpenEnvError, match="not to the row's opening"):
        interaction.respond(first_turn(interaction, "hi", {"seed": 1, "opening": "Say 3 words (0):"}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "give env= .* or base_url="),
        (dict(env=Words), "pass action_cls="),
        (dict(base_url="http://127.0.0.1:1", timeout_s=0), "timeout_s must be a number of seconds > 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OpenEnvInteraction(**kwargs)


def test_an_unreachable_server_is_named():
    sock = loopback_socket()  # bound, not listening: connections are refused
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(OpenEnvError, match=f"the OpenEnv server at {url} failed the connect"):
        OpenEnvInteraction(base_url=url, action="word").rows([0])
    sock.close()
