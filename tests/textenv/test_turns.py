"""Episodes of several turns against an uncached recomputation over the final context.

An interaction answers each agent turn with a reply of a length that depends on the
slot's context (so turns of different lengths share a batch), pays a turn reward, and
ends the episode after a drawn number of turns. Every finished episode is replayed
through one plain forward over its final context (prompt, agent tokens and environment
tokens, batch of one, no cache): each agent step's reference log-prob (and the policy's,
where the env steps one), its reward and the score must match to 1e-5. Environment tokens
are never steps: they earn nothing and carry no KL term.

A turn reward beyond float32 is refused naming the interaction; end_of_turn_token's text is the one token it
tokenizes to.
"""

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from tests.models import ENV_ID, end_episodes, lockstep_vec, tiny_causal_lm, uncached_logits, uncached_score
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.turns import Reply, Turn

ATOL = 1e-5
KL_COEF = 0.1
SETTINGS = dict(max_new_tokens=4, max_turns=3, max_env_tokens=5, kl_coef=KL_COEF)
REPLIES = [" and", " very good and", " but the", " the acting was"]  # 1 to 4 tokens


class Talk:
    """Replies with one of ``REPLIES`` (chosen by the context's length), pays 0.1 x (turn index + 1) each turn,
    and ends the episode after turn ``(sum of the prompt ids) % 3``: episodes of 1, 2 or 3 turns."""

    def respond(self, turn: Turn) -> Reply:
        reward = 0.1 * (turn.index + 1)
        if turn.index >= sum(turn.context_ids[:3]) % 3:
            return Reply(done=True, reward=reward)
        return Reply(text=REPLIES[len(turn.context_ids) % len(REPLIES)], reward=reward)


@dataclass
class Record:
    """One slot's episode: its context as it grows, and per agent step where in it the action sits."""

    context: list[int]
    prompt_length: int
    positions: list[int] = field(default_factory=list)  # index of each agent token in ``context``
    rewards: list[float] = field(default_factory=list)
    ref_logprobs: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)  # 0 on steps that did not end a turn
    score: float | None = None
    ended: bool = False
    truncated: bool = False


@pytest.fixture(scope="module")
def models():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).eval()
    return tokenizer, reference, reward_model


def context_of(observation: dict, slot: int) -> list[int]:
    ids, mask = observation["input_ids"][slot], observation["attention_mask"][slot]
    return ids[mask == 1].tolist()


def actions_for(rng, tokenizer, records: list[Record]) -> np.ndarray:
    """Ordinary tokens, EOS with probability 0.4 once a turn has a token (some turns reach the limit)."""
    specials = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in specials])
    out = rng.choice(ordinary, size=len(records))
    out[rng.random(len(records)) < 0.4] = tokenizer.eos_token_id
    return out


KEYS = ("ref_logprob", "logprob", "turn_reward", "env_tokens")


def record_step(record: Record, action, reward, info: dict, observation_context) -> None:
    """Append one agent step (and the environment's reply after it, ``info``'s values of ``KEYS``) to ``record``."""
    info_at = info.__getitem__
    record.context.append(int(action))
    record.positions.append(len(record.context) - 1)
    record.rewards.append(float(reward))
    record.ref_logprobs.append(float(info_at("ref_logprob")))
    logprob = info_at("logprob")  # None (single env) or NaN (vector env) without a policy
    record.logprobs.append(float("nan") if logprob is None else float(logprob))
    turn_reward = info_at("turn_reward")
    record.turn_rewards.append(0.0 if turn_reward is None or np.isnan(turn_reward) else float(turn_reward))
    record.context.extend(int(t) for t in info_at("env_tokens"))
    assert record.context == observation_context  # the observation is exactly the context so far


def run_vector(env, tokenizer, steps: int, seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    observation, _ = env.reset(seed=seed)
    n = env.num_envs
    records = [Record(context_of(observation, s), len(context_of(observation, s))) for s in range(n)]
    restarting = np.zeros(n, dtype=bool)
    finished = []
    for _ in range(steps):
        actions = actions_for(rng, tokenizer, records)
        observation, rewards, terminated, truncated, info = env.step(actions)
        for s in range(n):
            if restarting[s]:
                records[s] = Record(context_of(observation, s), len(context_of(observation, s)))
                continue
            r = records[s]
            if r.ended:
                assert rewards[s] == 0
                continue
            record_step(r, actions[s], rewards[s], {key: info[key][s] for key in KEYS}, context_of(observation, s))
            agent = observation["agent_mask"][s][observation["attention_mask"][s] == 1]
            assert [i for i, flag in enumerate(agent) if flag] == r.positions
            if terminated[s] or truncated[s]:
                r.ended, r.truncated, r.score = True, bool(truncated[s]), float(info["score"][s])
                finished.append(r)
        if env.autoreset_mode == AutoresetMode.NEXT_STEP:
            restarting = terminated | truncated
        elif all(r.ended for r in records):
            observation, _ = env.reset()
            records = [Record(context_of(observation, s), len(context_of(observation, s))) for s in range(n)]
    return finished


def check(records: list[Record], reference, reward_model, policy=None, dense: bool = False) -> None:
    """Each agent step against one plain forward over the episode's final context (agent and environment
    tokens); some episodes must have had replies. ``dense``: the score is paid per turn, the change of the
    uncached score of the context at each turn's end (the prompt's before the first turn)."""
    assert records
    for r in records:
        logits = uncached_logits(reference, r.context).double()
        logprobs = torch.log_softmax(logits, -1)
        ref = [float(logprobs[p - 1, r.context[p]]) for p in r.positions]
        np.testing.assert_allclose(r.ref_logprobs, ref, atol=ATOL)
        if policy is not None:
            policy_logprobs = torch.log_softmax(uncached_logits(policy, r.context).double(), -1)
            expected = [float(policy_logprobs[p - 1, r.context[p]]) for p in r.positions]
            np.testing.assert_allclose(r.logprobs, expected, atol=ATOL)
            kl_terms = [-KL_COEF * (lp - rl) for lp, rl in zip(expected, ref)]
        else:
            kl_terms = [KL_COEF * rl for rl in ref]  # no policy log-probs: the reference-only reward
        score = uncached_score(reward_model, r.context)
        assert r.score == pytest.approx(score, abs=ATOL)
        expected_rewards = [k + t for k, t in zip(kl_terms, r.turn_rewards)]
        if dense:
            ends = [i for i, t in enumerate(r.turn_rewards) if t] + [len(r.positions) - 1]  # each turn's last step
            previous = uncached_score(reward_model, r.context[: r.prompt_length])
            for i in sorted(set(ends)):
                current = uncached_score(reward_model, r.context[: r.positions[i] + 1])
                expected_rewards[i] += current - previous
                previous = current
        else:
            expected_rewards[-1] += score
        np.testing.assert_allclose(r.rewards, expected_rewards, atol=ATOL)
        assert len(r.rewards) == len(r.positions)  # environment tokens are not steps: one reward per agent token
    environment_tokens = sum(len(r.context) - r.prompt_length - len(r.positions) for r in records)
    assert environment_tokens > 0, "no episode had a reply: the test checked nothing of the turns"


@pytest.mark.parametrize("mode", ["NextStep", "Disabled"])
def test_vector_env_turns_match_uncached_recomputation(models, make_vec, mode):
    tokenizer, reference, reward_model = models
    env = make_vec(4, mode, interaction=Talk(), **SETTINGS)
    records = run_vector(env, tokenizer, steps=60, seed=0)
    assert {len([t for t in r.turn_rewards if t]) for r in records} >= {1, 2}  # episodes of several turn counts
    assert any(r.truncated for r in records) and any(not r.truncated for r in records)
    check(records, reference, reward_model)


@pytest.mark.parametrize("mode", ["NextStep", "Disabled"])
def test_dense_rewards_pay_each_turns_change_of_score(models, make_vec, mode):
    tokenizer, reference, reward_model = models
    env = make_vec(4, mode, interaction=Talk(), reward_mode="dense", **SETTINGS)
    records = run_vector(env, tokenizer, steps=60, seed=3)
    assert {len([t for t in r.turn_rewards if t]) for r in records} >= {2}  # episodes of several turns
    check(records, reference, reward_model, dense=True)


def test_vector_env_steps_its_policy_over_environment_tokens(models, make_vec):
    tokenizer, reference, reward_model = models
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    env = make_vec(3, "NextStep", interaction=Talk(), policy=policy, **SETTINGS)
    records = run_vector(env, tokenizer, steps=40, seed=1)
    check(records, reference, reward_model, policy=policy)


def test_single_env_turns_match_uncached_recomputation(models, make_env):
    tokenizer, reference, reward_model = models
    env = make_env(interaction=Talk(), **SETTINGS)
    rng = np.random.default_rng(2)
    records = []
    for seed in range(6):
        observation, _ = env.reset(seed=seed)
        r = Record(
            context_of({k: v[None] for k, v in observation.items()}, 0), int(observation["attention_mask"].sum())
        )
        while not r.ended:
            action = int(actions_for(rng, tokenizer, [r])[0])
            observation, reward, terminated, truncated, info = env.step(action)
            context = observation["input_ids"][observation["attention_mask"] == 1].tolist()
            record_step(r, action, reward, info, context)
            if terminated or truncated:
                r.ended, r.truncated, r.score = True, truncated, info["score"]
        records.append(r)
    check(records, reference, reward_model)


def test_sliding_window_caches_take_environment_tokens_exactly(make_vec):
    """A Mistral reference with a 3-token window: its cache is rebuilt after every reply."""
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    reference = tiny_causal_lm("mistral_short")
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR).eval()
    env = make_vec(3, "NextStep", interaction=Talk(), reference_model=reference, tokenizer=tokenizer, **SETTINGS)
    records = run_vector(env, tokenizer, steps=40, seed=3)
    check(records, reference, reward_model)


# --------------------------------------------------------------------------- limits, rewards, errors
class Fixed:
    def __init__(self, reply: Reply):
        self.reply = reply

    def respond(self, turn: Turn) -> Reply:
        return self.reply


def test_turn_rewards_land_on_the_last_agent_token_of_each_turn(make_env):
    env = make_env(interaction=Talk(), **SETTINGS)
    env.reset(seed=0, options={"prompt_index": 0})
    eos = env.unwrapped.tokenizer.eos_token_id
    _, r1, _, _, info1 = env.step(5)  # a token inside the first turn: no turn reward
    _, r2, _, _, info2 = env.step(eos)  # ends the first turn: 0.1 on this step
    assert info1["turn_reward"] is None and info1["env_tokens"] == []
    assert info2["turn_reward"] == pytest.approx(0.1)
    assert r1 == pytest.approx(KL_COEF * info1["ref_logprob"])
    assert r2 == pytest.approx(KL_COEF * info2["ref_logprob"] + 0.1 + (info2["score"] or 0.0), abs=1e-6)


def test_limits_truncate_and_done_terminates(make_env):
    eos = 2
    env = make_env(interaction=Fixed(Reply(text=" and")), max_new_tokens=3, max_turns=2, max_env_tokens=4)
    env.reset(seed=0)
    assert env.step(eos)[3] is False  # first turn ends, the reply is appended
    _, _, terminated, truncated, info = env.step(eos)  # the second and last allowed turn ends: truncated
    assert truncated and not terminated and info["env_tokens"] == []
    env.reset(seed=0)
    for _ in range(2):
        assert not any(env.step(7)[2:4])
    assert env.step(7)[3]  # a turn of max_new_tokens tokens without an end: truncated
    env = make_env(interaction=Fixed(Reply(done=True, reward=2.0)), max_new_tokens=3)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(eos)
    assert terminated and not truncated and info["turn_reward"] == 2.0


def test_missing_eos_penalty_only_where_a_turn_was_cut_off(make_env):
    """Ending the last allowed turn with EOS truncates the episode (the interaction would go on) but writes
    EOS: no penalty. A turn cut at max_new_tokens pays it, in a single-turn episode as in a multi-turn one."""
    nothing = [lambda **kwargs: 0.0]  # the score is 0: what is paid is the penalty alone
    eos, settings = 2, dict(max_new_tokens=3, max_turns=2, missing_eos_penalty=1.0, kl_coef=0.0, reward_fns=nothing)
    env = make_env(interaction=Fixed(Reply(text=" and")), **settings)
    env.reset(seed=0)
    assert env.step(eos)[1] == 0.0
    _, reward, terminated, truncated, _ = env.step(eos)
    assert truncated and not terminated and reward == 0.0
    env.reset(seed=0)
    env.step(eos)
    rewards = [env.step(7)[1] for _ in range(3)]  # the second turn runs into max_new_tokens
    assert rewards == [0.0, 0.0, -1.0]
    single = make_env(**settings)
    single.reset(seed=0)
    assert [single.step(7)[1] for _ in range(3)] == [0.0, 0.0, -1.0]
    single.reset(seed=0)
    _, reward, terminated, truncated, _ = single.step(eos)
    assert terminated and not truncated and reward == 0.0


def test_stop_strings_and_an_end_of_turn_token_end_a_turn(make_env):
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    good = tokenizer(" good", add_special_tokens=False)["input_ids"]
    env = make_env(interaction=Fixed(Reply(text=" and")), stop_strings=["good"], max_new_tokens=6)
    env.reset(seed=0)
    *_, info = env.step(good[-1])
    assert info["env_tokens"] == tokenizer(" and", add_special_tokens=False)["input_ids"]
    quite = tokenizer("quite", add_special_tokens=False)["input_ids"]
    for token, token_id in ((5, 5), ("quite", quite[0])):  # an id, or a text that is one token
        env = make_env(interaction=Fixed(Reply(text=" and")), end_of_turn_token=token, max_new_tokens=6)
        env.reset(seed=0)
        *_, info = env.step(token_id)
        assert info["env_tokens"] != []


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        ("text", TypeError, r"interaction Fixed returned 'text'; respond\(\) must return a textenv.turns.Reply"),
        (Reply(text="a", token_ids=[3]), ValueError, "both text and token_ids"),
        (Reply(text="a", reward=float("nan")), ValueError, "turn reward nan"),
        (Reply(token_ids=[3] * 9), ValueError, r"replied with 9 tokens, more than max_env_tokens=4"),
        (Reply(token_ids=[10**6]), ValueError, "token ids outside"),
    ],
)
def test_bad_replies_name_the_interaction(make_env, reply, error, match):
    env = make_env(interaction=Fixed(reply), max_env_tokens=4, max_new_tokens=8)
    env.reset(seed=0)
    with pytest.raises(error, match=match):
        env.step(2)


def test_configuration_errors(make_env):
    with pytest.raises(TypeError, match="respond"):
        make_env(interaction=object(), **SETTINGS)
    with pytest.raises(ValueError, match="end_of_turn_token 'no-such-token'"):
        make_env(interaction=Talk(), end_of_turn_token="no-such-token", **SETTINGS)
    with pytest.raises(ValueError, match=r"max_turns \* max_new_tokens.*exceeds the reference model's"):
        make_env(interaction=Talk(), max_turns=40, max_new_tokens=32)


# --------------------------------------------------------------------------- turn rewards, end of turn
def test_a_turn_reward_beyond_float32_is_refused_naming_the_interaction():
    from textenv.turns import Reply

    class Generous:
        def respond(self, turn):
            return Reply(done=True, reward=1e39)

    env = lockstep_vec(interaction=Generous())
    with pytest.raises(ValueError, match=r"interaction Generous returned the turn reward 1e\+39; .*float32"):
        end_episodes(env)


def test_end_of_turn_text_is_the_token_it_tokenizes_to():
    from textenv.turns import Reply

    class Done:
        def respond(self, turn):
            return Reply(done=True)

    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    (word,) = tokenizer("and", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(word) == "▁and" != "and"
    assert tokenizer.convert_tokens_to_ids("and") != word  # the word-internal piece the old lookup picked
    env = gym.make(ENV_ID, interaction=Done(), end_of_turn_token="and", max_new_tokens=6, device="cpu")
    assert word in env.unwrapped.core.turns.end_ids
    env = gym.make(ENV_ID, interaction=Done(), end_of_turn_token=word, max_new_tokens=6, device="cpu")
    assert word in env.unwrapped.core.turns.end_ids  # ids keep working
    with pytest.raises(
        ValueError,
        match=r"end_of_turn_token 'the end' is not one token of the tokenizer: it tokenizes to 2 token\(s\) "
        r"\['▁the', '▁end'\] \(ids \[\d+, \d+\]\); give a text that is exactly one token, or the token's id",
    ):
        gym.make(ENV_ID, interaction=Done(), end_of_turn_token="the end", max_new_tokens=6, device="cpu")
