"""agents/ppo.py: the update, on the real default task and on hand-made rollouts.

1. On the default task: one update moves every trainable parameter and no frozen one, gradient accumulation equals
   one big minibatch, the agent learns to emit a target token, save and load round-trip, dropout is off.
2. The KL estimators in the reward (k2, k3 swapped in for k1) and as a loss term, against values worked out by hand.
3. Update options on a one-layer GPT-2 of width 8 over 16 tokens: advantage scaling, the filter of groups whose
   returns are all equal, gradient accumulation under every loss option, bad options and arguments refused.
4. Fast paths that compute what the plain ones did: micro-batches cropped to their own episodes, the entropy's
   skipped zero backward, the tied embedding's sparse gradient in the update.
5. Episodes of several turns: GAE runs over the agent's steps only, and the environment's tokens get no gradient.
"""

import copy
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
)

import textenv  # noqa: F401
from agents.advantages import compute_gae
from agents.policy import ActorCritic
from agents.ppo import (
    EntropyOfLogprobs,
    PPOConfig,
    Scored,
    Targets,
    agent_steps,
    gae,
    micro_batch_loss,
    ppo_update,
    rollout_advantages,
    score_rollout,
    swap_kl_estimator,
)
from agents.rollout import Rollout, collect_rollout
from tests.models import tiny_gpt2_config
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import (
    disable_dropout,
    entropy_from_logits,
    logprobs_from_logits,
    position_ids_from_mask,
    token_logprobs,
)

LOCKSTEP = AutoresetMode.DISABLED  # every env here: rollouts reset all rows together


def rollout_of(agent, env, seed=0):
    return collect_rollout(agent, env, temperature=1.0, seed=seed, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("share_backbone", [True, False])
def test_one_update_moves_every_trainable_parameter_and_no_frozen_one(share_backbone, make_vec):
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    frozen_before = {
        name: copy.deepcopy(model.state_dict()) for name, model in (("ref", reference), ("rm", reward_model))
    }
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    env = make_vec(
        8,
        autoreset_mode=LOCKSTEP,
        max_new_tokens=12,
        reference_model=reference,
        reward_model=reward_model,
        tokenizer=tokenizer,
    )
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=reward_model)
    before = {name: p.detach().clone() for name, p in agent.named_parameters()}
    rollout = rollout_of(agent.eval(), env)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    # two optimizer steps: the value head starts at zero, so a separate critic trunk gets its first gradient
    # only once the head has moved
    config = PPOConfig(epochs=1, minibatch_size=4, micro_batch_size=2)
    metrics = ppo_update(
        agent.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=env.kl_coef
    )

    assert metrics["ppo/first_ratio_mean"] == 1.0  # old log-probs re-scored in the same micro-batches
    unchanged = [name for name, p in agent.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert (agent.critic is None) == share_backbone
    for name, model in (("ref", reference), ("rm", reward_model)):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in frozen_before[name].items()), f"{name} changed"
        assert not any(p.requires_grad for p in model.parameters())
    for key in ("loss/policy", "loss/value", "ppo/approx_kl", "ppo/clipfrac", "ppo/value_clipfrac",
                "ppo/explained_variance", "ppo/ratio_mean", "policy/entropy"):  # fmt: skip
        assert key in metrics and metrics[key] == metrics[key]  # present and not NaN


def test_gradient_accumulation_equals_one_big_minibatch(env):
    agent = ActorCritic.from_models(POLICY_DIR)
    rollout = rollout_of(agent.eval(), env)
    results = []
    for micro in (8, 2):
        clone = copy.deepcopy(agent).train()
        optimizer = torch.optim.SGD(clone.parameters(), lr=0.1)
        config = PPOConfig(epochs=1, minibatch_size=8, micro_batch_size=micro, max_grad_norm=1e9)
        ppo_update(clone, optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=env.kl_coef)
        results.append(dict(clone.named_parameters()))
    for name, parameter in results[0].items():
        torch.testing.assert_close(parameter, results[1][name], atol=2e-6, rtol=1e-4)


class TargetTokenReward(nn.Module):
    """A reward model for a tiny task: the score is 1 when ``target`` appears in the response, else 0."""

    def __init__(self, vocab_size: int, target: int, prompt_length: int):
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=0, model_type="target-token")
        self.embedding = nn.Embedding(vocab_size, 1)  # only so the env can check the vocabulary
        self.target, self.prompt_length = target, prompt_length

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, input_ids, attention_mask, **_):
        hits = ((input_ids == self.target) & attention_mask.bool()).sum(-1, keepdim=True).float()
        return SimpleNamespace(logits=hits.clamp(max=1))


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_learns_to_emit_a_target_token(algo, make_vec):
    """The SFT policy writes "quite" in about 1 response of 6; after 16 updates it writes it nearly always.

    Independent of torch's thread count (summation order): the first rollout is the SFT
    policy's, and the median over the last 8 rollouts tolerates a dip of a few.
    """
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    target = tokenizer.convert_tokens_to_ids("▁quite")
    prompt = "The film was"
    env = make_vec(
        16,
        autoreset_mode=LOCKSTEP,
        max_new_tokens=6,
        prompts=[prompt],
        reward_model=TargetTokenReward(len(tokenizer), target, len(tokenizer(prompt)["input_ids"])),
        kl_coef=0.01,
    )
    torch.manual_seed(0)
    agent = ActorCritic.from_models(POLICY_DIR)
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    config = PPOConfig(algo=algo, group_size=4, epochs=4, minibatch_size=8, micro_batch_size=8)
    group = None if algo == "ppo" else 4
    shuffling, sampling = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    scores = []
    for iteration in range(16):
        rollout = collect_rollout(agent.eval(), env, 1.0, iteration, sampling, group_size=group)
        scores.append(float(rollout.scores.mean()))
        ppo_update(agent.train(), optimizer, rollout, config, 1.0, shuffling, kl_coef=env.kl_coef)
    assert scores[0] <= 0.25, scores
    assert statistics.median(scores[-8:]) >= 0.85, scores


def test_save_and_load_round_trip(tmp_path, env):
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR)
    with torch.no_grad():
        agent.value_head.weight.normal_()
    agent.save_pretrained(tmp_path / "agent")
    loaded = ActorCritic.from_pretrained(tmp_path / "agent")
    rollout = rollout_of(agent.eval(), env)
    with torch.no_grad():
        a, b = score_rollout(agent, rollout, 1.0), score_rollout(loaded.eval(), rollout, 1.0)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    torch.testing.assert_close(a.values, b.values)
    # the policy alone is an ordinary Hugging Face model
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "agent")
    ids = rollout.input_ids[:1]
    torch.testing.assert_close(plain(ids).logits, agent.policy(ids).logits)


def test_dropout_kept_in_the_config_is_off_in_the_trained_agent():
    """OPT keeps its dropout rates as numbers (config and layer attributes); train-mode forwards must agree."""
    config = OPTConfig(
        vocab_size=64, hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, dropout=0.5, attention_dropout=0.5, layerdrop=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones_like(ids)
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        dropped = OPTForCausalLM(config).train()
        assert not torch.equal(dropped(ids).logits, dropped(ids).logits)  # the rates do act in train mode
        agent = ActorCritic.from_models(OPTForCausalLM(config)).train()
        first, second = agent(ids, mask, positions), agent(ids, mask, positions)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.values, second.values)
    assert agent.policy.config.dropout == agent.policy.config.attention_dropout == agent.policy.config.layerdrop == 0.0


# --------------------------------------------------------------------------- KL estimators
LN2 = math.log(2)

# the numbers of test_losses.py's KL estimators:
# log r = ref_logprobs - logprobs = ln 2, 0, -ln 2 (r = 2, 1, 1/2); a fourth, masked token of junk
LOGPROBS = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
REF_LOGPROBS = torch.tensor([[-1.0 + LN2, -2.0, -0.5 - LN2, 0.0]])
KL_MASK = torch.tensor([[True, True, True, False]])


@pytest.mark.parametrize(
    "estimator, expected_kl", [("k2", [LN2**2 / 2, 0.0, LN2**2 / 2]), ("k3", [1 - LN2, 0.0, LN2 - 0.5])]
)
def test_kl_in_the_reward_swaps_k1_for_the_estimator(estimator, expected_kl):
    beta, score = 0.5, 1.0
    kl = torch.where(KL_MASK, LOGPROBS - REF_LOGPROBS, 0.0)  # k1 = log pi - log pi_ref = -ln 2, 0, ln 2
    env_rewards = torch.tensor([[-beta * -LN2, 0.0, -beta * LN2 + score, 0.0]])  # what the env paid
    rewards = swap_kl_estimator(env_rewards, kl, LOGPROBS, REF_LOGPROBS, KL_MASK, beta, estimator)
    expected = [-beta * expected_kl[0], -beta * expected_kl[1], -beta * expected_kl[2] + score, 0.0]
    torch.testing.assert_close(rewards, torch.tensor([expected]))


def test_kl_in_the_loss_has_the_gradient_of_k3():
    # loss = beta * mean_t k3_t over the 3 valid tokens; zero advantages, so the policy term adds no gradient.
    # d k3 / d logp = d/dlogp [(exp(ref - logp) - 1) - (ref - logp)] = 1 - exp(ref - logp) = 1 - r
    # r = 2, 1, 1/2: gradient beta / 3 * (-1, 0, 1/2); mean k3 = ((1 - ln 2) + 0 + (ln 2 - 1/2)) / 3 = 1/6
    beta = 0.5
    logprobs = LOGPROBS.clone().requires_grad_()
    scored = Scored(logprobs=logprobs, values=torch.zeros(1, 5), entropy=torch.zeros(1, 4))
    zeros = torch.zeros(1, 4)
    targets = Targets(LOGPROBS.clone(), torch.zeros(1, 5), REF_LOGPROBS, zeros, zeros, KL_MASK)
    config = PPOConfig(algo="grpo", kl_penalty="loss", kl_estimator="k3")
    loss, stats = micro_batch_loss(scored, targets, torch.tensor([0]), config, kl_coef=beta, max_new_tokens=None)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-beta / 3, 0.0, beta / 3 * 0.5, 0.0]]))
    assert stats["loss/kl"].item() == pytest.approx(1 / 6)
    assert stats["ppo/kl_in_loss"].item() == pytest.approx(beta / 6)
    assert loss.item() == pytest.approx(beta / 6)


# --------------------------------------------------------------------------- update options
def test_advantage_scaling_defaults_to_the_algorithms_own():
    assert PPOConfig(algo="grpo").group_scaling == "group"
    assert PPOConfig(algo="rloo").group_scaling == "none"
    assert PPOConfig(algo="rloo", advantage_scaling="batch").group_scaling == "batch"


LENGTHS = [3, 2, 1, 3]  # four episodes in two groups of two


def tiny_rollout(returns, seed=0) -> Rollout:
    """Four episodes of LENGTHS steps after a 2-token prompt; each return paid on the last step."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[step < n for step in range(3)] for n in LENGTHS])
    actions = torch.where(mask, torch.randint(3, 16, (4, 3), generator=gen), 0)
    rewards = torch.zeros(4, 3)
    rewards[torch.arange(4), torch.tensor(LENGTHS) - 1] = torch.tensor(returns)
    ref_logprobs = torch.where(mask, -2.5 + 0.3 * torch.randn(4, 3, generator=gen), 0.0)
    logprobs = torch.where(mask, ref_logprobs + 0.2 * torch.randn(4, 3, generator=gen), 0.0)
    return Rollout(
        prompt_ids=torch.randint(3, 16, (4, 2), generator=gen),
        prompt_mask=torch.ones(4, 2, dtype=torch.long),
        actions=actions,
        logprobs=logprobs,
        rewards=rewards,
        mask=mask,
        terminated=torch.tensor([True, True, True, False]),
        truncated=torch.tensor([False, False, False, True]),
        scores=torch.tensor(returns),
        kl=logprobs - ref_logprobs,
        ref_logprobs=ref_logprobs,
        prompts=["a", "a", "b", "b"],
        responses=[""] * 4,
        reward_terms={},
    )


def test_filtered_groups_leave_the_mask_and_carry_no_advantage():
    # group (1, 1) is filtered; group (0, 1): centered -0.5, 0.5, group std sqrt(0.25 + 0.25) = sqrt(0.5)
    config = PPOConfig(algo="grpo", group_size=2, filter_equal_groups=True, whiten_advantages=False)
    rollout = tiny_rollout([1.0, 1.0, 0.0, 1.0])
    advantages, _, mask = rollout_advantages(rollout, torch.zeros(4, 4), config, kl_coef=0.0)
    torch.testing.assert_close(mask, rollout.mask & torch.tensor([False, False, True, True])[:, None])
    per_episode = 0.5 / (0.5**0.5 + 1e-4)
    expected = torch.tensor([[0.0] * 3, [0.0] * 3, [-per_episode, 0.0, 0.0], [per_episode] * 3])
    torch.testing.assert_close(advantages, expected)


def tiny_agent() -> ActorCritic:
    torch.manual_seed(0)
    agent = ActorCritic.from_models(GPT2LMHeadModel(tiny_gpt2_config(16)))
    with torch.no_grad():
        agent.value_head.weight.normal_()  # a critic that predicts something, so the value loss has a gradient
    return agent.train()


def update(agent, rollout, config, optimizer=None, kl_coef=0.0, **kwargs):
    optimizer = optimizer or torch.optim.SGD(agent.parameters(), lr=0.1)
    return ppo_update(
        agent, optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=kl_coef, **kwargs
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
@pytest.mark.parametrize(
    "options",
    [
        {"algo": "ppo"},
        {"algo": "grpo", "filter_equal_groups": True, "kl_penalty": "loss", "kl_estimator": "k3"},
        {"algo": "rloo", "kl_estimator": "k2", "advantage_scaling": "batch", "clip_range_high": 0.28},
    ],
)
def test_gradient_accumulation_equals_one_big_minibatch_under_every_loss_option(aggregation, options):
    rollout = tiny_rollout([1.0, 1.0, 0.0, 1.0])  # with the filter on, the first group drops out
    agent = tiny_agent()
    results = []
    for micro in (4, 1, 2):
        clone = copy.deepcopy(agent)
        sizes = {"minibatch_size": 4, "micro_batch_size": micro, "max_grad_norm": 1e9}
        config = PPOConfig(**options, **sizes, group_size=2, epochs=1, loss_aggregation=aggregation)
        update(clone, rollout, config, kl_coef=0.1, max_new_tokens=3)
        results.append(dict(clone.named_parameters()))
    assert any(not torch.equal(p, results[0][name]) for name, p in agent.named_parameters())
    for result in results[1:]:
        for name, parameter in results[0].items():
            torch.testing.assert_close(parameter, result[name], atol=1e-6, rtol=1e-5)


def test_an_update_whose_groups_are_all_filtered_takes_no_step():
    agent = tiny_agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-2)
    config = PPOConfig(
        algo="grpo", group_size=2, epochs=2, minibatch_size=2, micro_batch_size=1, filter_equal_groups=True
    )
    first = update(agent, tiny_rollout([1.0, 0.0, 0.0, 1.0]), config, optimizer)  # Adam gathers momentum
    assert first["ppo/filtered_groups"] == 0.0 and first["ppo/idle_steps"] == 0
    before = copy.deepcopy(agent.state_dict())
    metrics = update(agent, tiny_rollout([1.0, 1.0, 0.5, 0.5]), config, optimizer)
    assert metrics["ppo/filtered_groups"] == 1.0
    assert metrics["ppo/idle_steps"] == metrics["ppo/steps"] == 4 and metrics["ppo/skipped_steps"] == 0
    assert all(torch.equal(value, before[key]) for key, value in agent.state_dict().items())
    assert all(math.isfinite(value) for value in metrics.values())


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"loss_aggregation": "sum"}, ValueError, "loss_aggregation"),
        ({"kl_estimator": "k4"}, ValueError, "kl_estimator"),
        ({"kl_penalty": "both"}, ValueError, "kl_penalty"),
        ({"algo": "grpo", "advantage_scaling": "prompt"}, ValueError, "advantage_scaling"),
        ({"clip_range_high": 0.0}, ValueError, "clip_range_high"),
        ({"clip_range_high": float("nan")}, ValueError, "clip_range_high"),
        ({"algo": "grpo", "filter_equal_groups": 1}, TypeError, "filter_equal_groups"),
        ({"algo": "ppo", "advantage_scaling": "group"}, ValueError, "advantage_scaling"),
        ({"algo": "ppo", "filter_equal_groups": True}, ValueError, "filter_equal_groups"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, error, match):
    with pytest.raises(error, match=match):
        PPOConfig(**options)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "max_new_tokens"),
        ({"max_new_tokens": 2}, "max_new_tokens"),  # the rollout took 3 steps
        ({"max_new_tokens": 3, "kl_coef": -0.1}, "kl_coef"),
    ],
)
def test_update_arguments_are_checked(kwargs, match):
    config = PPOConfig(loss_aggregation="constant")
    with pytest.raises(ValueError, match=match):
        update(tiny_agent(), tiny_rollout([1.0, 0.0, 0.0, 1.0]), config, **kwargs)


def test_the_kl_coefficient_is_a_required_keyword():
    """Forgotten, a default of 0 would silently drop the k2/k3 swap and the KL loss term."""
    agent = tiny_agent()
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="kl_coef"):
        ppo_update(agent, optimizer, tiny_rollout([1.0, 0.0, 0.0, 1.0]), PPOConfig(), 1.0, torch.Generator())
    with pytest.raises(TypeError):
        ppo_update(agent, optimizer, tiny_rollout([1.0, 0.0, 0.0, 1.0]), PPOConfig(), 1.0, torch.Generator(), None, 0.1)


# --------------------------------------------------------------------------- fast paths
def test_entropy_forward_is_entropy_from_logits_and_a_zero_gradient_skips_its_backward():
    logits = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(2))
    logprobs = logprobs_from_logits(logits)
    assert torch.equal(EntropyOfLogprobs.apply(logprobs), entropy_from_logits(logits))
    tokens = torch.randint(0, 11, (5, 7))

    def gradient(entropy_fn, weight):
        x = logits.clone().requires_grad_()
        lp = logprobs_from_logits(x)
        loss = lp.gather(-1, tokens[..., None]).sum() + weight * entropy_fn(lp).sum()
        loss.backward()
        return x.grad

    def plain(lp):
        return -(lp.exp() * lp).sum(-1)

    for weight in (0.0, 0.3):  # 0: the backward is skipped; else autograd's own gradient of the same expression
        assert torch.equal(gradient(EntropyOfLogprobs.apply, weight), gradient(plain, weight))


@pytest.fixture(scope="module")
def rollout_and_agent(make_vec):
    env = make_vec(16, autoreset_mode=AutoresetMode.DISABLED, max_new_tokens=12)
    agent = ActorCritic.from_models(POLICY_DIR).eval()
    rollout = collect_rollout(agent, env, 1.0, seed=4, generator=torch.Generator().manual_seed(4))
    lengths = rollout.mask.sum(1)
    assert lengths.min() < lengths.max() and (rollout.prompt_mask == 0).any()  # padding on both sides to crop
    return rollout, agent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cropped_micro_batch_scores_as_the_uncropped_full_forward(rollout_and_agent, temperature):
    rollout, agent = rollout_and_agent
    lengths = rollout.mask.sum(1)
    rows = lengths.argsort()[:5]  # the shortest episodes: the most to crop on the right
    part = rollout.select(rows)
    with torch.no_grad():
        scored = score_rollout(agent, part, temperature)
        # the plain computation: the whole layout, logits everywhere
        mask = part.attention_mask
        out = agent(part.input_ids, mask, position_ids_from_mask(mask))
        width, steps = part.prompt_ids.shape[1], part.actions.shape[1]
        logits = out.logits[:, width - 1 : width - 1 + steps]
        logprobs, entropy = token_logprobs(logits, part.actions, temperature), entropy_from_logits(logits, temperature)
        values = out.values[:, width - 1 : width + steps]
    taken = part.mask
    assert scored.logprobs.shape == taken.shape and scored.values.shape == (len(rows), steps + 1)
    torch.testing.assert_close(scored.logprobs[taken], logprobs[taken], atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.entropy[taken], entropy[taken], atol=1e-5, rtol=0)
    assert scored.logprobs[~taken].eq(0).all() and scored.entropy[~taken].eq(0).all()
    used = torch.arange(steps + 1) <= part.mask.sum(1, keepdim=True)  # V(s_0) .. V(s_len): what GAE reads
    torch.testing.assert_close(scored.values[used], values[used], atol=1e-5, rtol=0)


class Recording(ActorCritic):
    """Records whether each forward had gradients on and asked for the sparse lookup; ``allow`` False turns the
    request down (autograd's dense lookup)."""

    def __init__(self, policy, allow: bool = True):
        super().__init__(policy)
        self.allow, self.asked = allow, set()

    def forward(self, *args, sparse_embedding_grad: bool = False, **kwargs):
        self.asked.add((torch.is_grad_enabled(), sparse_embedding_grad))
        return super().forward(*args, sparse_embedding_grad=sparse_embedding_grad and self.allow, **kwargs)


def recorded_update(agent: ActorCritic, rollout, allow: bool = True) -> Recording:
    """One ``ppo_update`` (Adam, packed micro-batches) of a ``Recording`` copy of ``agent``."""
    recording = Recording(copy.deepcopy(agent.policy), allow)
    recording.value_head.load_state_dict(agent.value_head.state_dict())
    disable_dropout(recording)
    optimizer = torch.optim.Adam(recording.parameters(), lr=3e-4, eps=1e-5)
    config = PPOConfig(epochs=2, minibatch_size=8, micro_batch_size=4)
    ppo_update(recording.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=0.05)
    return recording


def test_the_update_asks_for_the_sparse_gradient_and_ends_at_the_same_weights_to_the_bit(rollout_and_agent):
    rollout, agent = rollout_and_agent
    sparse, dense = recorded_update(agent, rollout), recorded_update(agent, rollout, allow=False)
    assert sparse.asked == {(False, False), (True, True)}  # asked for in the update's forwards, not the re-score's
    weights = dense.state_dict()
    assert all(torch.equal(value, weights[name]) for name, value in sparse.state_dict().items())


def test_under_a_process_group_the_update_keeps_autograds_dense_lookup(rollout_and_agent):
    rollout, agent = rollout_and_agent
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:  # DDP and FSDP reduce the gradient autograd accumulates: tested with the dense one only
        assert recorded_update(agent, rollout).asked == {(False, False), (True, False)}
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- several turns
KL_COEF = 0.05  # the multi-turn rollout's kl_coef: multi_turn_rollout_and_agent in tests/agents/conftest.py


def test_gae_runs_over_agent_steps_only():
    """Hand example: agent, env, env, agent, agent (end). Compacted, it is ordinary GAE over three steps, and
    the second step's next value is the value before the third agent token (after the reply)."""
    mask = torch.tensor([[True, False, False, True, True, False]])
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 9.0, 9.0, 0.3, 0.4, 9.0, 9.0]])  # V before each column; 9: never used
    terminated = torch.tensor([[False, False, False, False, True, False]])
    config = PPOConfig(gamma=0.9, lam=0.8)
    advantages, returns = gae(rewards, values, terminated, mask, config)
    compact_adv, _ = compute_gae(
        torch.tensor([[1.0, 0.5, 2.0]]),
        torch.tensor([[0.1, 0.3, 0.4]]),
        torch.tensor([[0.3, 0.4, 9.0]]),
        torch.tensor([[False, False, True]]),
        torch.ones(1, 3, dtype=torch.bool),
        0.9,
        0.8,
    )
    # by hand: delta = (1 + 0.9*0.3 - 0.1, 0.5 + 0.9*0.4 - 0.3, 2 - 0.4) = (1.17, 0.56, 1.6)
    a3 = 1.6
    a2 = 0.56 + 0.9 * 0.8 * a3
    a1 = 1.17 + 0.9 * 0.8 * a2
    torch.testing.assert_close(advantages[0, mask[0]], torch.tensor([a1, a2, a3]))
    torch.testing.assert_close(advantages[0, mask[0]], compact_adv[0])
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
    order, next_columns, steps = agent_steps(mask)
    assert order[0, :3].tolist() == [0, 3, 4] and next_columns[0, :3].tolist() == [3, 4, 5]


@pytest.mark.parametrize("kl_penalty", ["reward", "loss"])
def test_environment_tokens_get_no_gradient(multi_turn_rollout_and_agent, kl_penalty):
    rollout, agent = multi_turn_rollout_and_agent
    config = PPOConfig(kl_penalty=kl_penalty, kl_estimator="k3")
    scored = score_rollout(agent, rollout, 1.0)
    scored.logprobs.retain_grad()
    scored.entropy.retain_grad()
    scored.values.retain_grad()
    with torch.no_grad():
        old = score_rollout(agent, rollout, 1.0)
    advantages, returns = gae(rollout.rewards, old.values, rollout.terminated_steps, rollout.mask, config)
    targets = Targets(old.logprobs, old.values, rollout.ref_logprobs, advantages, returns, rollout.mask)
    config.ent_coef = 0.01
    loss, _ = micro_batch_loss(scored, targets, torch.arange(len(rollout.actions)), config, KL_COEF, None)
    loss.backward()
    for name in ("logprobs", "entropy"):
        grad = getattr(scored, name).grad
        assert (grad[rollout.env_mask] == 0).all() and grad[rollout.mask].abs().sum() > 0, name
    value_grad = scored.values.grad[:, :-1]
    assert (value_grad[rollout.env_mask] == 0).all() and value_grad[rollout.mask].abs().sum() > 0


def test_constant_aggregation_counts_agent_steps_not_environment_tokens(multi_turn_rollout_and_agent):
    """Dr. GRPO's constant L bounds an episode's agent steps: the rollout's columns also hold the replies."""
    rollout, agent = multi_turn_rollout_and_agent
    steps = int(rollout.mask.sum(1).max())
    assert rollout.actions.shape[1] > steps  # the replies' columns are not steps
    config = PPOConfig(loss_aggregation="constant", epochs=1, minibatch_size=8, micro_batch_size=8)
    agent = copy.deepcopy(agent).train()
    optimizer = torch.optim.SGD(agent.parameters(), lr=0.1)
    for longest in (steps, 2 * 14):  # the episodes' most agent steps, and the bound the trainer passes
        ppo_update(agent, optimizer, rollout, config, 1.0, torch.Generator(), kl_coef=KL_COEF, max_new_tokens=longest)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ppo_update(agent, optimizer, rollout, config, 1.0, torch.Generator(), kl_coef=KL_COEF, max_new_tokens=steps - 1)
    assert TokenEnvConfig(max_new_tokens=14, max_turns=2).agent_tokens(turns=True) == 28  # what the trainer passes
    assert TokenEnvConfig(max_new_tokens=14, max_turns=2).agent_tokens(turns=False) == 14


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_baselines_of_several_turns_are_per_episode(algo):
    # two groups of two episodes of several turns: each episode's steps (its agent tokens; the columns between turns
    # held the environment's replies and are no steps) all get the episode's return against its group's, whatever
    # the turn: the baseline is per episode, not per turn index
    from agents.ppo import ADVANTAGES, PPOConfig

    mask = torch.tensor(
        [[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool
    )
    rewards = torch.tensor(
        [
            [0.1, 0.5, 0, 0, -0.2, 1.0, 0],
            [0.0, 0, 0.3, 0.0, 2.0, 0, 0],
            [1, 0, 0, 0, 0, 0.5, -1],
            [0.2, 0.4, 0, 0, 0, 0, 0],
        ]
    )
    config = PPOConfig(algo=algo, group_size=2, whiten_advantages=False)
    advantages, _ = ADVANTAGES[algo](rewards, torch.zeros(4, 8), torch.zeros(4, 7, dtype=torch.bool), mask, config)
    returns = [1.4, 2.3, 0.5, 0.6]  # each episode's rewards over its turns
    if algo == "rloo":  # the others' mean in its group: with two, the other episode
        expected = [1.4 - 2.3, 2.3 - 1.4, 0.5 - 0.6, 0.6 - 0.5]
    else:  # minus the group's mean, over the group's std (n - 1)
        std = [statistics.stdev(returns[:2])] * 2 + [statistics.stdev(returns[2:])] * 2
        expected = [(r - (returns[2 * (i // 2)] + returns[2 * (i // 2) + 1]) / 2) / (s + 1e-4) for i, (r, s) in
                    enumerate(zip(returns, std))]  # fmt: skip
    for row in range(4):
        assert torch.allclose(
            advantages[row][mask[row]], torch.tensor(expected[row]).expand(int(mask[row].sum())), atol=1e-5
        )
        assert (advantages[row][~mask[row]] == 0).all()


def test_per_turn_figures_by_hand():
    # two episodes: row 0 writes 2 tokens, gets a reply of 2, writes 2 more; row 1 ends after its first turn
    from agents.ppo import turn_stats

    env = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    taken = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    rollout = SimpleNamespace(
        env_mask=env, mask=taken, rewards=torch.tensor([[0.1, 0.5, 0, 0, -0.2, 1.0], [0.0, 0.3, 2.0, 0, 0, 0]])
    )
    values = torch.tensor([[0.5, 0.6, 0.0, 0.0, 0.9, 1.1, 0.0], [0.2, 0.4, 0.7, 0.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([[1.0, 2.0, 0, 0, 3.0, 5.0], [-1.0, -2.0, -3.0, 0, 0, 0]])
    stats = {k: round(float(v), 5) for k, v in turn_stats(rollout, values, advantages, taken, critic=True).items()}
    assert stats == {
        "turn/0/episodes": 1.0, "turn/0/reward": round((0.6 + 2.3) / 2, 5), "turn/0/advantage": round(-3 / 5, 5),
        "turn/0/value": round((0.5 + 0.2) / 2, 5),
        "turn/1/episodes": 0.5, "turn/1/reward": 0.8, "turn/1/advantage": 4.0, "turn/1/value": 0.9,
    }  # fmt: skip
    fixed = turn_stats(rollout, values, advantages, taken, critic=False, turns=3)  # the same keys in every process
    assert float(fixed["turn/2/episodes"]) == 0 and float(fixed["turn/2/reward"]) == 0 and "turn/0/value" not in fixed
    assert turn_stats(SimpleNamespace(env_mask=None), values, advantages, taken, critic=True) == {}
