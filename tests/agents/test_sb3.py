"""stable-baselines3 on TokenRLHF-v0 (``agents/sb3/``, docs/sb3.md).

SB3's PPO and A2C unchanged on ``gym.make`` (and the rewards in PPO's rollout buffer);
the ``TokenVecEnv`` adapter's SB3 semantics, checked against single-env replays; the
LM policy's log-probs against the LM's own; the env's reward under KL sources 2 and 3;
SB3's PPO training the LM. The learning measurements (examples/) are marked slow.
"""

import importlib.util
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.vec_env import VecMonitor
from transformers import AutoModelForCausalLM, AutoTokenizer

import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.policy import load_value_head, value_head
from agents.sb3 import LMActorCriticPolicy, SB3PolicyLogprobs, TokenVecEnv
from textenv import TokenGenerationEnv, TokenGenerationVectorEnv
from textenv.default_task import POLICY_DIR, load_prompts
from textenv.lm import position_ids_from_mask

ENV_ID = "TokenRLHF-v0"
EOS = 2
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two
    when other processes compete for the cores (threads spin-waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


def fresh_lm(noise: float = 0.0, seed: int = 0):
    lm = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    if noise:  # move the policy away from the reference, so that the KL term is not 0
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in lm.transformer.h[-1].parameters():
                parameter.add_(noise * torch.randn(parameter.shape, generator=generator))
    return lm.eval()


def lm_logprobs(lm, observation: dict, temperature: float = 1.0) -> torch.Tensor:
    """The LM's own next-token log-probs on a batch of env observations: one plain forward, no SB3."""
    ids = torch.as_tensor(np.asarray(observation["input_ids"])).long()
    mask = torch.as_tensor(np.asarray(observation["attention_mask"])).long()
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def make_policy(env, lm=None, temperature: float = 1.0) -> LMActorCriticPolicy:
    return LMActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-4, lm=lm, temperature=temperature)


# --------------------------------------------------------------------------- SB3 unchanged on gym.make
class RecordRewards(gym.Wrapper):
    """The rewards the env itself returned, in order."""

    def __init__(self, env):
        super().__init__(env)
        self.rewards = []

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.rewards.append(reward)
        return observation, reward, terminated, truncated, info


class CheckRolloutBuffer(BaseCallback):
    """After each rollout, before the update: the buffer's rewards are the env's rewards.

    SB3 adds ``gamma * V(terminal observation)`` to the reward of a truncated step
    (bootstrapping a time limit); the expected rewards include that term, computed
    with the same (not yet updated) policy.
    """

    def __init__(self):
        super().__init__()
        self.rewards, self.bootstrap, self.seen, self.rollouts = [], [], [], 0
        self.truncations = 0

    def _on_rollout_start(self) -> None:
        self.rewards, self.bootstrap = [], []

    def _on_step(self) -> bool:
        rewards = np.array(self.locals["rewards"], dtype=np.float32)  # a copy: SB3 modifies it in place next
        self.seen.append(rewards.copy())
        extra = np.zeros_like(rewards)
        for i, (done, info) in enumerate(zip(self.locals["dones"], self.locals["infos"])):
            if done and info.get("TimeLimit.truncated"):
                self.truncations += 1
                terminal = self.model.policy.obs_to_tensor(info["terminal_observation"])[0]
                with torch.no_grad():
                    extra[i] = self.model.gamma * float(self.model.policy.predict_values(terminal)[0])
        self.rewards.append(rewards)
        self.bootstrap.append(extra)
        return True

    def _on_rollout_end(self) -> None:
        expected = np.stack(self.rewards) + np.stack(self.bootstrap)
        np.testing.assert_allclose(self.model.rollout_buffer.rewards, expected, rtol=1e-5, atol=1e-6)
        self.rollouts += 1


def test_sb3_env_checker_passes():
    env = gym.make(ENV_ID, max_new_tokens=3)
    check_env(env.unwrapped, warn=False, skip_render_check=True)
    env.close()


def test_ppo_multiinput_learns_and_its_buffer_holds_the_env_rewards():
    env = RecordRewards(gym.make(ENV_ID, max_new_tokens=4))
    model = PPO("MultiInputPolicy", env, n_steps=128, batch_size=64, n_epochs=2, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    check = CheckRolloutBuffer()
    model.learn(384, callback=check)
    assert model.num_timesteps == 384 and check.rollouts == 3
    assert check.truncations > 0  # the bootstrapped case was exercised
    # what reached SB3 is exactly what the env returned, step by step
    np.testing.assert_allclose(np.concatenate(check.seen), np.float32(env.rewards), rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())


def test_a2c_multiinput_runs():
    env = gym.make(ENV_ID, max_new_tokens=4)
    model = A2C("MultiInputPolicy", env, n_steps=8, seed=0)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(160)
    assert model.num_timesteps == 160
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters()))


# --------------------------------------------------------------------------- the VecEnv adapter
def test_vec_env_follows_sb3_semantics_and_matches_single_env_replays(tokenizer):
    """Done slots return the next episode's first observation, the final one in terminal_observation;
    the others advance by their action; every finished episode replays exactly in a single env."""
    num_envs, max_new = 3, 3
    venv = TokenVecEnv(num_envs=num_envs, max_new_tokens=max_new)
    prompts = load_prompts("train")
    vocab = int(venv.action_space.n)
    venv.seed(0)
    observation = venv.reset()
    assert all(observation[k].shape == (num_envs, 16 + max_new) for k in ("input_ids", "attention_mask"))
    episodes = [[{"prompt_index": venv.reset_infos[i]["prompt_index"], "actions": [], "rewards": []}] for i in range(3)]
    rng = np.random.default_rng(0)
    finished, terminated_seen = [], 0
    for t in range(14):
        actions = rng.integers(3, vocab, size=num_envs)
        if t % 3 == 1:
            actions[t % num_envs] = EOS  # some episodes terminate, the rest are truncated
        new_observation, rewards, dones, infos = venv.step(actions)
        assert rewards.dtype == np.float32 and rewards.shape == (num_envs,)
        assert dones.dtype == bool and len(infos) == num_envs
        for i in range(num_envs):
            assert venv.observation_space.contains({k: v[i] for k, v in new_observation.items()})
            episode = episodes[i][-1]
            episode["actions"].append(int(actions[i]))
            episode["rewards"].append(float(rewards[i]))
            if dones[i]:
                terminal = infos[i]["terminal_observation"]
                assert terminal["input_ids"][-1] == actions[i]
                assert infos[i]["TimeLimit.truncated"] == (actions[i] != EOS)
                assert isinstance(infos[i]["response"], str) and infos[i]["score"] is not None
                terminated_seen += actions[i] == EOS
                episode["terminal"] = terminal
                episode["terminated"] = actions[i] == EOS
                finished.append(episode)
                # the returned observation is the next episode's prompt, alone in the window
                index = venv.reset_infos[i]["prompt_index"]
                assert venv.reset_infos[i]["prompt"] == prompts[index]
                ids = tokenizer(prompts[index])["input_ids"]
                assert new_observation["attention_mask"][i].sum() == len(ids)
                assert new_observation["input_ids"][i][-len(ids) :].tolist() == ids
                episodes[i].append({"prompt_index": index, "actions": [], "rewards": []})
            else:
                assert "terminal_observation" not in infos[i] and infos[i]["score"] is None
                assert new_observation["input_ids"][i][-1] == actions[i]
                assert new_observation["attention_mask"][i].sum() == observation["attention_mask"][i].sum() + 1
        observation = new_observation
    assert len(finished) >= 8 and terminated_seen >= 2

    single = TokenGenerationEnv(max_new_tokens=max_new)
    for episode in finished:
        single_observation, _ = single.reset(options={"prompt_index": episode["prompt_index"]})
        for step, (action, reward) in enumerate(zip(episode["actions"], episode["rewards"])):
            single_observation, single_reward, terminated, truncated, _ = single.step(action)
            assert single_reward == pytest.approx(reward, abs=1e-4)
            assert (terminated or truncated) == (step == len(episode["actions"]) - 1)
        assert terminated == episode["terminated"]
        for key in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(single_observation[key], episode["terminal"][key])
    venv.close()
    single.close()


def test_vec_env_attributes_seeding_and_options():
    venv = TokenVecEnv(num_envs=3, max_new_tokens=2)
    assert venv.get_attr("kl_coef") == [0.05] * 3
    assert venv.get_attr("kl_coef", indices=[1]) == [0.05]
    venv.set_attr("kl_coef", 0.2)
    assert venv.kl_coef == 0.2 and venv.get_attr("kl_coef") == [0.2] * 3
    with pytest.raises(ValueError, match="share one env"):
        venv.set_attr("kl_coef", 0.1, indices=[0])
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    with pytest.warns(UserWarning, match="render_mode"):
        assert venv.env_method("render", indices=[0, 2]) == [None, None]  # called once, result per slot

    venv.seed(7)
    venv.reset()
    first = [info["prompt_index"] for info in venv.reset_infos]
    other = TokenVecEnv(num_envs=3, max_new_tokens=2)
    other.seed(7)
    other.reset()
    assert [info["prompt_index"] for info in other.reset_infos] == first
    venv.set_options([{"prompt_index": 4}, {"prompt_index": 5}, {"prompt_index": 6}])
    venv.reset()
    assert [info["prompt_index"] for info in venv.reset_infos] == [4, 5, 6]
    venv.set_options({"group_size": 3})
    venv.reset()
    assert len({info["prompt_index"] for info in venv.reset_infos}) == 1

    made = gym.make_vec(ENV_ID, num_envs=2, vectorization_mode="vector_entry_point", autoreset_mode="Disabled")
    wrapped = TokenVecEnv(made)
    wrapped.reset()
    assert wrapped.num_envs == 2 and wrapped.step(np.array([5, 6]))[0]["input_ids"][:, -1].tolist() == [5, 6]
    with pytest.raises(ValueError, match="Disabled"):
        TokenVecEnv(TokenGenerationVectorEnv(num_envs=2))  # NEXT_STEP
    with pytest.raises(RuntimeError, match="reset"):
        TokenVecEnv(num_envs=2, max_new_tokens=2).step(np.zeros(2, dtype=np.int64))

    monitored = VecMonitor(TokenVecEnv(num_envs=2, max_new_tokens=2))
    monitored.reset()
    _, _, dones, infos = monitored.step(np.array([5, EOS]))
    assert dones.tolist() == [False, True] and infos[1]["episode"]["l"] == 1
    _, _, dones, infos = monitored.step(np.array([5, 5]))
    assert dones.tolist() == [True, False] and infos[0]["episode"]["l"] == 2


# --------------------------------------------------------------------------- the LM policy
def test_lm_policy_logprobs_equal_the_lm_logprobs():
    venv = TokenVecEnv(num_envs=4, max_new_tokens=6)
    temperature = 0.7
    policy = make_policy(venv, temperature=temperature)
    reference_lm = fresh_lm()
    venv.seed(0)
    observation = venv.reset()
    rng = np.random.default_rng(0)
    for _ in range(4):  # contexts of several lengths
        obs_tensor, _ = policy.obs_to_tensor(observation)
        expected = lm_logprobs(reference_lm, observation, temperature)
        with torch.no_grad():
            table = policy.get_distribution(obs_tensor).distribution.logits
            torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)
            actions = torch.as_tensor(rng.integers(0, venv.action_space.n, size=4))
            _, log_prob, entropy = policy.evaluate_actions(obs_tensor, actions)
            torch.testing.assert_close(log_prob, expected.gather(1, actions[:, None])[:, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1), atol=1e-4, rtol=0)
            # the rollout buffer stores observations as float32: same distribution
            floats = {k: v.float() for k, v in obs_tensor.items()}
            torch.testing.assert_close(policy.get_distribution(floats).distribution.logits, table)
            sampled, values, sampled_log_prob = policy(obs_tensor)
            torch.testing.assert_close(sampled_log_prob, expected.gather(1, sampled[:, None])[:, 0], atol=1e-5, rtol=0)
            assert torch.equal(values, torch.zeros(4, 1))  # zero-initialised value head
        observation, *_ = venv.step(rng.integers(3, venv.action_space.n, size=4))


def test_lm_policy_structure():
    venv = TokenVecEnv(num_envs=2, max_new_tokens=2)
    lm = fresh_lm()
    policy = make_policy(venv, lm=lm)
    assert policy.lm is lm  # a module is trained in place
    assert policy.action_net.head is lm.get_output_embeddings()
    optimized = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in lm.parameters()} <= optimized
    assert {id(p) for p in policy.value_net.parameters()} <= optimized
    with pytest.raises(ValueError, match="fixes"):
        LMActorCriticPolicy(venv.observation_space, venv.action_space, lambda _: 1e-4, net_arch=[64])
    with pytest.raises(ValueError, match="action space"):
        LMActorCriticPolicy(venv.observation_space, gym.spaces.Discrete(10), lambda _: 1e-4)


def test_ppo_with_the_lm_policy_trains_the_lm(tmp_path):
    lm = fresh_lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    kl = SB3PolicyLogprobs()
    venv = TokenVecEnv(num_envs=4, max_new_tokens=4, policy=kl)
    model = PPO(LMActorCriticPolicy, venv, n_steps=8, batch_size=16, n_epochs=2, seed=0, policy_kwargs={"lm": lm})
    kl.policy = model.policy
    check = CheckRolloutBuffer()
    model.learn(64, callback=check)
    assert check.rollouts == 2
    changed = {k for k, v in lm.state_dict().items() if not torch.equal(v, before[k])}
    assert "transformer.wte.weight" in changed and "transformer.h.0.attn.c_attn.weight" in changed
    assert model.policy.value_net.weight.abs().sum() > 0

    # what SB3 saves loads back to the same policy; save_pretrained gives a plain HF model
    venv.seed(1)
    observation = venv.reset()
    obs_tensor, _ = model.policy.obs_to_tensor(observation)
    with torch.no_grad():
        table = model.policy.get_distribution(obs_tensor).distribution.logits
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=venv)
    with torch.no_grad():
        torch.testing.assert_close(loaded.policy.get_distribution(obs_tensor).distribution.logits, table)
    model.policy.save_pretrained(tmp_path / "lm")
    torch.testing.assert_close(lm_logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), observation), table)
    head = value_head(model.policy.features_dim)  # the value head beside it is the native agent's format
    load_value_head(head, tmp_path / "lm")
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), model.policy.value_net.parameters()))


# --------------------------------------------------------------------------- the KL term
def check_source_two(venv, policy, steps: int, rng, sample_from_policy: bool) -> int:
    """Step ``venv`` (given ``SB3PolicyLogprobs(policy)``) and check each reward against the documented formula.

    With ``sample_from_policy``, most actions come from SB3's rollout forward (as in PPO's rollout), and the
    other steps run a forward on different observations just before the env step: the env's log-probs must be
    those of the observations it was given, whatever the policy ran last.
    """
    kl_coef = venv.kl_coef
    observation = venv.reset()
    reference = fresh_lm()
    ends = 0
    for t in range(steps):
        obs_tensor, _ = policy.obs_to_tensor(observation)
        with torch.no_grad():
            expected_table = policy.get_distribution(obs_tensor).distribution.logits
            if sample_from_policy and t % 3 != 2:
                actions = policy(obs_tensor)[0].numpy()  # SB3's rollout forward picks the actions
            else:
                actions = rng.integers(3, venv.action_space.n, size=venv.num_envs)
                if sample_from_policy:  # the latest forward ran on other observations
                    stale = {k: v.clone() for k, v in obs_tensor.items()}
                    stale["input_ids"][:, -1] = (stale["input_ids"][:, -1] + 1) % venv.action_space.n
                    policy(stale)
        expected_logprob = expected_table.gather(1, torch.as_tensor(actions)[:, None])[:, 0].numpy()
        expected_ref = lm_logprobs(reference, observation).gather(1, torch.as_tensor(actions)[:, None])[:, 0].numpy()
        observation, rewards, dones, infos = venv.step(actions)
        for i, info in enumerate(infos):
            assert info["kl_source"] == "policy"
            assert info["logprob"] == pytest.approx(expected_logprob[i], abs=1e-5)
            assert info["ref_logprob"] == pytest.approx(expected_ref[i], abs=1e-4)
            assert info["kl"] == pytest.approx(info["logprob"] - info["ref_logprob"], abs=1e-6)
            score = info["score"] if dones[i] else 0.0
            assert (info["score"] is not None) == bool(dones[i])
            documented = -kl_coef * (info["logprob"] - info["ref_logprob"]) + score
            assert rewards[i] == pytest.approx(documented, abs=1e-5)
            ends += bool(dones[i])
    return ends


def test_kl_source_2_lm_policy_reward_is_minus_kl_coef_times_kl_plus_score():
    kl = SB3PolicyLogprobs()
    venv = TokenVecEnv(num_envs=3, max_new_tokens=3, policy=kl, kl_coef=0.1)
    with pytest.raises(RuntimeError, match="kl.policy = model.policy"):
        venv.reset()
        venv.step(np.array([5, 5, 5]))
    policy = make_policy(venv, lm=fresh_lm(noise=0.05))
    kl.policy = policy
    ends = check_source_two(venv, policy, steps=7, rng=np.random.default_rng(0), sample_from_policy=True)
    assert ends >= 3


def test_kl_source_2_unchanged_lm_policy_has_zero_kl():
    """The LM policy before training is the reference: the env's KL is ~0 (cached env vs full forward)."""
    kl = SB3PolicyLogprobs()
    venv = TokenVecEnv(num_envs=3, max_new_tokens=3, policy=kl)
    kl.policy = make_policy(venv)
    venv.reset()
    for _ in range(4):
        _, _, _, infos = venv.step(np.random.default_rng(1).integers(3, venv.action_space.n, size=3))
        assert all(abs(info["kl"]) < 1e-4 for info in infos)


def test_kl_source_2_any_sb3_policy():
    kl = SB3PolicyLogprobs()
    venv = TokenVecEnv(num_envs=2, max_new_tokens=3, policy=kl, kl_coef=0.2)
    kl.policy = PPO("MultiInputPolicy", venv, seed=0).policy
    check_source_two(venv, kl.policy, steps=4, rng=np.random.default_rng(2), sample_from_policy=False)
    # the single env takes it too (SB3 then runs gym.make'd envs through DummyVecEnv)
    single_kl = SB3PolicyLogprobs()
    env = gym.make(ENV_ID, max_new_tokens=3, policy=single_kl, kl_coef=0.2)
    model = PPO("MultiInputPolicy", env, n_steps=16, batch_size=16, n_epochs=1, seed=0)
    single_kl.policy = model.policy
    model.learn(32)
    observation, _ = env.reset(seed=0)
    with torch.no_grad():
        table = model.policy.get_distribution(model.policy.obs_to_tensor(observation)[0]).distribution.logits
    _, reward, _, _, info = env.step(7)
    assert info["kl_source"] == "policy" and info["logprob"] == pytest.approx(float(table[0, 7]), abs=1e-5)
    assert reward == pytest.approx(-0.2 * (info["logprob"] - info["ref_logprob"]), abs=1e-5)


def test_kl_source_3_reward_is_kl_coef_times_ref_logprob_plus_score():
    venv = TokenVecEnv(num_envs=3, max_new_tokens=3, kl_coef=0.1)
    reference = fresh_lm()
    observation = venv.reset()
    rng = np.random.default_rng(3)
    ends = 0
    for t in range(7):
        actions = rng.integers(3, venv.action_space.n, size=3)
        if t == 1:
            actions[0] = EOS
        expected_ref = lm_logprobs(reference, observation).gather(1, torch.as_tensor(actions)[:, None])[:, 0]
        observation, rewards, dones, infos = venv.step(actions)
        for i, info in enumerate(infos):
            assert info["kl_source"] == "reference_only" and info["logprob"] is None and info["kl"] is None
            assert info["ref_logprob"] == pytest.approx(float(expected_ref[i]), abs=1e-4)
            score = info["score"] if dones[i] else 0.0
            assert rewards[i] == pytest.approx(0.1 * info["ref_logprob"] + score, abs=1e-5)
            ends += bool(dones[i])
    assert ends >= 4


def test_entropy_bonus_identity():
    """E_pi[log pi_ref] + H(pi) = -KL(pi || pi_ref): source 3 plus ent_coef = kl_coef is the KL-regularised reward."""
    generator = torch.Generator().manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(5, 446, generator=generator), -1)
    log_ref = torch.log_softmax(torch.randn(5, 446, generator=generator), -1)
    pi = log_pi.exp()
    lhs = (pi * log_ref).sum(-1) - (pi * log_pi).sum(-1)
    torch.testing.assert_close(lhs, -(pi * (log_pi - log_ref)).sum(-1))


# --------------------------------------------------------------------------- the measurements (slow)
def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_lm_policy_raises_the_positive_rate(tmp_path, monkeypatch, capsys):
    example = load_example("sb3_lm_policy")
    argv = ["sb3_lm_policy", "--steps", "4096", "--eval-episodes", "64", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    example.main()
    result = json.loads((tmp_path / "sb3_lm_policy.json").read_text())["results"]["SB3 PPO + LMActorCriticPolicy"]
    assert result["tokens"] == 4096
    assert result["after"]["positive_rate"] > result["before"]["positive_rate"] + 0.1
    assert result["after"]["kl"] > result["before"]["kl"]
    assert "| SB3 PPO + LMActorCriticPolicy |" in capsys.readouterr().out


@pytest.mark.slow
def test_example_ppo_mlp_beats_random(tmp_path, monkeypatch):
    example = load_example("sb3_ppo_mlp")
    argv = ["sb3_ppo_mlp", "--steps", "16384", "--eval-episodes", "50", "--algos", "ppo", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    example.main()
    results = json.loads((tmp_path / "sb3_ppo_mlp.json").read_text())["results"]
    trained = results["SB3 PPO MultiInputPolicy, 16384 steps"]
    assert trained["return"] > results["uniform random"]["return"] + 3


# --------------------------------------------------------------------------- episodes of several turns
class TwoTurns:
    """Replies " and" after the agent's first turn, pays 0.5 there, and ends the episode after its second."""

    def respond(self, turn):
        from textenv.turns import Reply

        return Reply(text=" and", reward=0.5) if turn.index == 0 else Reply(done=True, reward=1.0)


def test_sb3_ppo_with_the_lm_policy_runs_episodes_of_several_turns():
    """SB3 sees the environment's tokens in its observations (agent_mask 0 there) and the turn rewards in the
    rewards of the steps that ended turns; the LM policy reads the whole context, replies included."""
    lm = fresh_lm()
    kl = SB3PolicyLogprobs()
    venv = TokenVecEnv(num_envs=4, max_new_tokens=3, max_turns=2, max_env_tokens=2, interaction=TwoTurns(), policy=kl)
    assert set(venv.observation_space.spaces) == {"input_ids", "attention_mask", "agent_mask"}
    model = PPO(LMActorCriticPolicy, venv, n_steps=8, batch_size=16, n_epochs=1, seed=0, policy_kwargs={"lm": lm})
    kl.policy = model.policy
    model.learn(32)
    buffer = model.rollout_buffer
    observations = {key: value.reshape(-1, value.shape[-1]) for key, value in buffer.observations.items()}
    agent, real = observations["agent_mask"].astype(bool), observations["attention_mask"].astype(bool)
    reply_after_agent = agent[:, :-1] & ~agent[:, 1:] & real[:, 1:]  # a real token not the agent's, after its own
    assert reply_after_agent.any()  # some observations held the environment's reply
    turn_rewards = [info["turn_reward"] for info in venv.step(np.full(4, 2))[3] if info["turn_reward"] is not None]
    assert turn_rewards and set(turn_rewards) <= {0.5, 1.0}
