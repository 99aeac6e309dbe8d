"""The env and the agent on every architecture family of ``tests.models``, checked against plain recomputation.

Each family's tiny causal LM is the env's reference (and, where a test says so, its reward model is the
family's tiny classifier). Full-attention caches (GPT-2, Llama, Qwen, GPT-NeoX, OPT, Gemma, Phi-3) are edited
row by row on a partial restart; sliding-window and mixed caches (Gemma 2/3, Mistral) are rebuilt from every
row's tokens. Both must give, for every step of every finished episode, the log-probs, scores and rewards
of one plain forward over prompt + response (batch of one, no cache, no padding), to 1e-5.

Run with ``-s`` to print the largest differences seen, family by mode, at the end of the module.
"""

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, ppo_update, score_rollout
from agents.rollout import collect_rollout, make_rollout_env
from tests.models import (
    FAMILIES,
    Episode,
    tiny_causal_lm,
    tiny_reward_model,
    uncached_logits,
    uncached_logprobs,
    uncached_score,
)
from textenv.default_task import POLICY_DIR, load_prompts
from textenv.lm import CachedStepper, pad_batch

ATOL = 1e-5
MAX_NEW = 6
KL_COEF = 0.1
EOS = 2
# openings of the default task of 3 to 8 tokens: contexts of different lengths, longer than a window of 6
PROMPTS = [
    "The dialogue is",
    "Overall the film was",
    "For me the acting is",
    "In my opinion the ending is",
    "To be fair, the film was",
    "To be fair, the lead actor is",
]
MODES = ("stepper", "next_step", "disabled", "single", "dense", "policy", "ppo", "long")

# (family, mode) -> quantity -> largest absolute difference from the uncached recomputation
DIFFS: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))


class Checks:
    """Compares env numbers with their uncached recomputation; records every difference, then fails on the worst.

    Every episode is compared before anything fails, so the table holds the full size of a discrepancy.
    """

    def __init__(self, family: str, mode: str):
        self.family, self.mode = family, mode
        self.worst: dict[str, tuple[float, str]] = {}

    def close(self, quantity: str, got, expected, where: str = "") -> float:
        got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
        difference = float(np.max(np.abs(got - expected))) if got.size else 0.0
        table = DIFFS[self.family, self.mode]
        table[quantity] = max(table[quantity], difference)
        if difference > self.worst.get(quantity, (-1.0, ""))[0]:
            detail = where
            if got.size <= 12:
                detail += f": env {np.round(got, 6).tolist()} vs uncached {np.round(expected, 6).tolist()}"
            self.worst[quantity] = (difference, detail)
        return difference

    def verify(self) -> None:
        bad = {q: w for q, w in self.worst.items() if w[0] > ATOL}
        assert not bad, f"{self.family} / {self.mode}: " + "; ".join(
            f"{q} off by {d:.2e} ({detail})" for q, (d, detail) in bad.items()
        )


def table_cell(diffs: dict[str, float]) -> str:
    """ "ref_logprob / reward", then any other quantity by name; a single-quantity mode gives its one number."""
    if "ref_logprob" not in diffs:
        return " ".join(f"{name} {value:.1e}" for name, value in diffs.items())
    rest = [f"{name} {value:.1e}" for name, value in diffs.items() if name not in ("ref_logprob", "reward")]
    return " ".join([f"{diffs['ref_logprob']:.1e} / {diffs['reward']:.1e}", *rest])


@pytest.fixture(scope="module", autouse=True)
def difference_table():
    """Print the largest differences as a markdown table once the module has run (shown with ``pytest -s``)."""
    yield
    modes = [mode for mode in MODES if any(key[1] == mode for key in DIFFS)]
    if not modes:
        return
    lines = ["", "max |env - uncached|: ref_logprob / reward, then other quantities", ""]
    lines.append("| family | " + " | ".join(modes) + " |")
    lines.append("|---" * (len(modes) + 1) + "|")
    for family in FAMILIES:
        cells = [table_cell(DIFFS[family, mode]) if (family, mode) in DIFFS else "-" for mode in modes]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


def test_prompts_are_default_task_prompts_of_different_lengths(tokenizer):
    assert set(PROMPTS) <= set(load_prompts("train"))
    assert [len(ids) for ids in tokenizer(PROMPTS)["input_ids"]] == [3, 4, 5, 6, 7, 8]


class Script:
    """Actions for each slot: ordinary tokens, then EOS after a drawn length (beyond ``max_new``: truncated)."""

    def __init__(self, tokenizer, num_slots: int, seed: int, max_new: int = MAX_NEW):
        self.rng = np.random.default_rng(seed)
        specials = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
        self.ordinary = np.array([i for i in range(len(tokenizer)) if i not in specials])
        self.max_new = max_new
        self.planned = self.rng.integers(1, max_new + 3, size=num_slots)

    def actions(self, episodes: list[Episode]) -> np.ndarray:
        out = self.rng.choice(self.ordinary, size=len(episodes))
        for slot, episode in enumerate(episodes):
            if len(episode.actions) + 1 == self.planned[slot]:
                out[slot] = EOS
        return out

    def new_episode(self, slot: int) -> None:
        self.planned[slot] = self.rng.integers(1, self.max_new + 3)


def prompt_of(observation: dict, slot: int) -> list[int]:
    ids, mask = observation["input_ids"][slot], observation["attention_mask"][slot]
    return ids[mask == 1].tolist()


@dataclass
class Run:
    finished: list[Episode]
    partial_restarts: int = 0  # steps on which some slots started a new episode while others went on
    sources: set = field(default_factory=set)


def run_vector(env, script: Script, steps: int, caller_logprobs=False, reset_every=0, seed=1) -> Run:
    """Drive ``env``; record every finished episode from what the env returned.

    NEXT_STEP: ended slots restart on the following step. DISABLED: every ``reset_every`` steps
    ``reset(options={"reset_mask": ...})`` restarts the ended slots and, now and then, abandons a live one.
    """
    rng = np.random.default_rng(seed)
    observation, _ = env.reset(seed=0)
    n = env.num_envs
    episodes = [Episode(prompt_of(observation, s)) for s in range(n)]
    restarting = np.zeros(n, dtype=bool)
    run = Run([])
    for step in range(steps):
        actions = script.actions(episodes)
        logprobs = -rng.exponential(2.0, size=n) if caller_logprobs else None
        observation, rewards, terminated, truncated, info = env.step(actions, logprobs=logprobs)
        run.partial_restarts += bool(restarting.any() and not restarting.all())
        for s in range(n):
            if restarting[s]:  # NEXT_STEP: this step started a new episode and ignored the action
                assert rewards[s] == 0 and not terminated[s] and not truncated[s]
                episodes[s] = Episode(prompt_of(observation, s))
                script.new_episode(s)
                continue
            e = episodes[s]
            if e.ended:  # lockstep: an ended slot waits and earns nothing
                assert rewards[s] == 0 and not terminated[s] and not truncated[s]
                continue
            e.actions.append(int(actions[s]))
            e.rewards.append(float(rewards[s]))
            e.ref_logprobs.append(float(info["ref_logprob"][s]))
            e.logprobs.append(float(logprobs[s]) if caller_logprobs else float(info["logprob"][s]))
            run.sources.add(info["kl_source"][s])
            e.terminated, e.truncated = bool(terminated[s]), bool(truncated[s])
            assert info["_score"][s] == e.ended
            if e.ended:
                e.score = float(info["score"][s])
                assert info["response"][s] is not None
                run.finished.append(e)
        if env.autoreset_mode == AutoresetMode.NEXT_STEP:
            restarting = terminated | truncated
        elif reset_every and step % reset_every == reset_every - 1:
            mask = np.array([e.ended for e in episodes]) | (rng.random(n) < 0.1)  # some live ones abandoned
            if mask.any():
                observation, _ = env.reset(options={"reset_mask": mask})
                run.partial_restarts += not mask.all()
                for s in np.flatnonzero(mask):
                    episodes[s] = Episode(prompt_of(observation, s))
                    script.new_episode(s)
    return run


def check_episode(
    checks: Checks, episode: Episode, reference, reward_model, source: str, max_new=MAX_NEW, temperature=1.0
) -> None:
    """The episode's ref log-probs, score and rewards against plain forwards and the reward formula."""
    assert len(episode.actions) >= 1
    assert episode.terminated == (episode.actions[-1] == EOS)
    assert episode.truncated == (not episode.terminated and len(episode.actions) == max_new)
    where = f"prompt {episode.prompt}, actions {episode.actions}"
    ref = uncached_logprobs(reference, episode.prompt, episode.actions, temperature)
    checks.close("ref_logprob", episode.ref_logprobs, ref, where)
    score = uncached_score(reward_model, episode.prompt + episode.actions)
    checks.close("score", episode.score, score, where)
    if source == "reference_only":
        expected = KL_COEF * ref
    else:
        expected = -KL_COEF * (np.array(episode.logprobs) - ref)
    expected[-1] += score
    checks.close("reward", episode.rewards, expected, where)


def family_env(make, family: str, *args, reference=None, reward_model=None, tokenizer=None, **kwargs):
    """An env on the short prompts with ``family``'s tiny reference and reward model (given or built)."""
    return make(
        *args,
        reference_model=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
        prompts=PROMPTS,
        max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW),
        kl_coef=KL_COEF,
        **kwargs,
    )


# ---------------------------------------------------------------- the stepper alone: a row that waits


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_stepper_row_that_waits_a_step_matches_uncached(family):
    """A row that skips a step (a masked pad, as a NEXT_STEP restart gives) then goes on.

    Row 0's context (7 tokens) is longer than a window of 6; row 1 is short and always live.
    As the env does, a cache that cannot be edited in place is rebuilt after a step in
    which a row waited (its masked column would take a real token's place in the window).
    """
    model = tiny_causal_lm(family)
    checks = Checks(family, "stepper")
    rows = [[10, 11, 12, 13, 14, 15, 16], [20, 21, 22]]
    for waits in ([], [0], [0, 1]):  # steps on which row 0 waits
        stepper = CachedStepper(model, pad_token_id=0)
        stepper.prefill(*pad_batch(rows, 0))
        contexts = [list(r) for r in rows]
        for step in range(4):
            live = torch.tensor([step not in waits, True])
            tokens = torch.tensor([30 + step, 40 + step])
            last = stepper.advance(tokens, live)
            for row in range(2):
                if live[row]:
                    contexts[row].append(int(tokens[row]))
            if not live.all() and not stepper.editable:
                stepper.rebuild(contexts)
                last = stepper.last
                checks.close(
                    "logits",
                    last[row],
                    uncached_logits(model, contexts[row])[-1],
                    f"row {row} step {step} waits {waits}",
                )
    checks.verify()


# ---------------------------------------------------------------- batched env, both autoreset modes


@pytest.mark.parametrize("family", FAMILIES)
def test_next_step_autoreset_matches_uncached_recomputation(family, tokenizer, make_vec):
    # handed over in train mode with nonzero dropout rates: the env must freeze them
    reference, reward_model = tiny_causal_lm(family).train(), tiny_reward_model(family).train()
    env = family_env(make_vec, family, 4, reference=reference, reward_model=reward_model, tokenizer=tokenizer)
    assert env.autoreset_mode == AutoresetMode.NEXT_STEP
    assert not reference.training and not reward_model.training
    run = run_vector(env, Script(tokenizer, 4, seed=0), steps=30)
    assert run.partial_restarts >= 3 and run.sources == {"reference_only"}
    assert len(run.finished) >= 10
    assert any(e.truncated for e in run.finished) and any(e.terminated for e in run.finished)
    assert len({len(e.prompt) for e in run.finished}) >= 3
    checks = Checks(family, "next_step")
    for episode in run.finished:
        check_episode(checks, episode, reference, reward_model, "reference_only")
    checks.verify()


@pytest.mark.parametrize("family", FAMILIES)
def test_lockstep_partial_resets_match_uncached_recomputation(family, tokenizer, make_vec):
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    env = family_env(
        make_vec,
        family,
        4,
        autoreset_mode=AutoresetMode.DISABLED,
        reference=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    run = run_vector(env, Script(tokenizer, 4, seed=3), steps=30, reset_every=3)
    assert run.partial_restarts >= 3
    assert len(run.finished) >= 8
    assert any(e.truncated for e in run.finished) and any(e.terminated for e in run.finished)
    checks = Checks(family, "disabled")
    for episode in run.finished:
        check_episode(checks, episode, reference, reward_model, "reference_only")
    checks.verify()


# ---------------------------------------------------------------- single env


@pytest.mark.parametrize("family", FAMILIES)
def test_single_env_matches_uncached_recomputation(family, tokenizer, make_env):
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    env = family_env(make_env, family, reference=reference, reward_model=reward_model, tokenizer=tokenizer)
    script = Script(tokenizer, 1, seed=0)
    checks = Checks(family, "single")
    lengths = set()
    for seed, planned in enumerate([1, 3, MAX_NEW + 2]):
        script.planned[0] = planned
        observation, info = env.reset(seed=seed, options={"prompt_index": len(PROMPTS) - 1 - seed})
        episode = Episode(prompt_of({k: v[None] for k, v in observation.items()}, 0))
        assert episode.prompt == tokenizer(info["prompt"])["input_ids"]
        while not episode.ended:
            action = int(script.actions([episode])[0])
            observation, reward, terminated, truncated, info = env.step(action)
            assert info["kl_source"] == "reference_only"
            episode.actions.append(action)
            episode.rewards.append(reward)
            episode.ref_logprobs.append(info["ref_logprob"])
            episode.terminated, episode.truncated = terminated, truncated
            assert (info["score"] is None) != episode.ended
        episode.score = info["score"]
        lengths.add(len(episode.actions))
        check_episode(checks, episode, reference, reward_model, "reference_only")
    assert lengths == {1, 3, MAX_NEW}
    checks.verify()


# ---------------------------------------------------------------- dense rewards: the reward model steps too


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_scores_are_uncached_prefix_scores(family, tokenizer, make_vec):
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    env = family_env(
        make_vec, family, 4, reward_mode="dense", reference=reference, reward_model=reward_model, tokenizer=tokenizer
    )
    run = run_vector(env, Script(tokenizer, 4, seed=7), steps=30, caller_logprobs=True)
    assert run.partial_restarts >= 3 and len(run.finished) >= 10
    checks = Checks(family, "dense")
    for episode in run.finished:
        where = f"prompt {episode.prompt}, actions {episode.actions}"
        ref = uncached_logprobs(reference, episode.prompt, episode.actions)
        checks.close("ref_logprob", episode.ref_logprobs, ref, where)
        tokens = episode.prompt + episode.actions
        prefix_scores = np.array(
            [uncached_score(reward_model, tokens[: len(episode.prompt) + k]) for k in range(len(episode.actions) + 1)]
        )
        checks.close("score", episode.score, prefix_scores[-1], where)
        kl_part = -KL_COEF * (np.array(episode.logprobs) - ref)
        checks.close("reward", episode.rewards, kl_part + np.diff(prefix_scores), where)
        terms = np.array(episode.rewards) - kl_part  # the score terms
        checks.close("terms_sum", terms.sum(), episode.score - prefix_scores[0], where)  # final - prompt score
        # the env's score of each prefix, read back from its final score and the terms after that prefix
        env_prefix_scores = episode.score - np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])
        checks.close("prefix_score", env_prefix_scores, prefix_scores, where)
    checks.verify()


# ---------------------------------------------------------------- a policy module as the KL source


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_module_is_the_kl_source(family, tokenizer, make_vec):
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    policy = tiny_causal_lm(family, seed=7)
    env = family_env(
        make_vec,
        family,
        4,
        policy=policy,
        temperature=0.7,
        reference=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    run = run_vector(env, Script(tokenizer, 4, seed=5), steps=25)
    assert run.sources == {"policy"} and len(run.finished) >= 8
    checks = Checks(family, "policy")
    for episode in run.finished:
        expected = uncached_logprobs(policy, episode.prompt, episode.actions, temperature=0.7)
        checks.close("logprob", episode.logprobs, expected, f"prompt {episode.prompt}, actions {episode.actions}")
        check_episode(checks, episode, reference, reward_model, "policy", temperature=0.7)
    checks.verify()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_policy_module_in_train_mode_is_stepped_without_dropout(family, tokenizer, make_vec):
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    policy = tiny_causal_lm(family, seed=7).train()  # as a training loop leaves its model between updates
    env = family_env(
        make_vec, family, 4, policy=policy, reference=reference, reward_model=reward_model, tokenizer=tokenizer
    )
    run = run_vector(env, Script(tokenizer, 4, seed=5), steps=25)
    checks = Checks(family, "policy_train_mode")
    with torch.no_grad():
        policy.eval()
        for episode in run.finished:
            expected = uncached_logprobs(policy, episode.prompt, episode.actions)
            checks.close("logprob", episode.logprobs, expected, f"prompt {episode.prompt}, actions {episode.actions}")
    checks.verify()


# ---------------------------------------------------------------- two PPO iterations


def dropout_rates(model: torch.nn.Module) -> list[float]:
    """Every dropout probability a model holds: in its dropout modules, layer attributes and configs."""
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    holders = [*model.modules(), *(m.config for m in model.modules() if hasattr(m, "config"))]
    for holder in holders:
        for name, value in vars(holder).items():
            if isinstance(value, float) and any(word in name for word in ("dropout", "pdrop", "layerdrop")):
                rates.append(value)
    return rates


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ppo_iterations(family, tokenizer):
    env = make_rollout_env(
        8,
        reference_model=tiny_causal_lm(family),
        reward_model=tiny_reward_model(family),
        tokenizer=tokenizer,
        prompts=PROMPTS,
        max_new_tokens=4,
        device="cpu",
    )
    policy = tiny_causal_lm(family)
    assert max(dropout_rates(policy)) > 0  # the config's rates are on before the agent takes the model
    agent = ActorCritic.from_models(policy)
    assert dropout_rates(agent) and max(dropout_rates(agent)) == 0.0
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    config = PPOConfig(epochs=2, minibatch_size=4, micro_batch_size=2)
    sampling, shuffling = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    checks = Checks(family, "ppo")
    for iteration in range(2):
        rollout = collect_rollout(agent.eval(), env, 1.0, iteration, sampling)
        assert rollout.mask.any(1).all()
        with torch.no_grad():  # the cached sampling log-probs against one teacher-forced forward
            scored = score_rollout(agent, rollout, 1.0)
        checks.close("logprob", rollout.logprobs[rollout.mask], scored.logprobs[rollout.mask], f"rollout {iteration}")
        metrics = ppo_update(agent.train(), optimizer, rollout, config, 1.0, shuffling, kl_coef=env.kl_coef)
        assert metrics["ppo/first_ratio_mean"] == 1.0, (iteration, metrics["ppo/first_ratio_mean"])
        assert metrics["ppo/skipped_steps"] == 0
    trainable = [(name, p) for name, p in agent.named_parameters() if p.requires_grad]
    assert trainable
    assert all(torch.isfinite(p).all() for _, p in trainable), [n for n, p in trainable if not torch.isfinite(p).all()]
    checks.verify()


# ---------------------------------------------------------------- long runs of sliding-window caches


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_thousand_autoreset_steps_stay_exact_and_bounded(family, tokenizer, make_vec):
    max_new = 8
    reference, reward_model = tiny_causal_lm(family), tiny_reward_model(family)
    env = make_vec(
        4, reference_model=reference, reward_model=reward_model, tokenizer=tokenizer, max_new_tokens=max_new,
        kl_coef=KL_COEF,
    )  # fmt: skip
    core = env.unwrapped.core
    bound = core.config.max_prompt_tokens + max_new + 1
    rng = np.random.default_rng(0)
    specials = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in specials])
    observation, _ = env.reset(seed=0)
    episodes = [Episode(prompt_of(observation, s)) for s in range(4)]
    restarting = np.zeros(4, dtype=bool)
    finished, widest = [], 0
    for _ in range(1000):
        actions = np.where(rng.random(4) < 0.15, EOS, rng.choice(ordinary, size=4))
        observation, rewards, terminated, truncated, info = env.step(actions)
        widest = max(widest, core.reference.mask.shape[1])
        assert core.reference.mask.shape[1] <= bound
        for s in range(4):
            if restarting[s]:
                episodes[s] = Episode(prompt_of(observation, s))
                continue
            e = episodes[s]
            e.actions.append(int(actions[s]))
            e.rewards.append(float(rewards[s]))
            e.ref_logprobs.append(float(info["ref_logprob"][s]))
            e.terminated, e.truncated = bool(terminated[s]), bool(truncated[s])
            if e.ended:
                e.score = float(info["score"][s])
                finished.append(e)
        restarting = terminated | truncated
    assert len(finished) >= 300
    assert any(e.truncated for e in finished) and any(e.terminated for e in finished)
    checks = Checks(family, "long")
    for episode in finished[::10]:
        check_episode(checks, episode, reference, reward_model, "reference_only", max_new=max_new)
    print(f"\n{family}: {len(finished)} episodes in 1000 steps, widest reference cache {widest} (bound {bound})")
    checks.verify()
