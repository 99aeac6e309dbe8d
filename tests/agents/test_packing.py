"""Packed micro-batches: the plan by hand, and packed forwards equal to padded ones in every family."""

import copy
import random

import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.packing import first_fit_decreasing, packing_works, plan_packing
from agents.policy import ActorCritic
from agents.ppo import PPOConfig, crop_to_episodes, ppo_update, score_rollout
from agents.rollout import collect_rollout
from tests.models import FAMILIES, tiny_causal_lm
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import position_ids_from_mask


def test_first_fit_decreasing_by_hand():
    # longest first: 5 -> row 0, 4 -> row 1, 3 -> row 2, 2 -> row 1 (room 2), 1 -> row 0 (room 1)
    assert first_fit_decreasing([5, 3, 4, 2, 1], 6) == [[0, 4], [2, 3], [1]]
    assert first_fit_decreasing([6, 6], 6) == [[0], [1]]


def test_plan_packing_by_hand():
    ids = torch.tensor([[9, 11, 12, 13, 9], [21, 22, 9, 9, 9], [9, 9, 31, 32, 33]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]])
    packing = plan_packing(ids, mask, filler=0)
    # lengths 3, 2, 3 in rows of 5: [episode 0, episode 1] and [episode 2, filler]; 10 cells instead of 15
    assert packing.ids.tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 0, 0]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert torch.equal(packing.unpack(packing.ids), ids * mask)
    where = torch.tensor([[0, 0, 1, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert packing.packed_positions(where).tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]
    # cells computed in packed order (12, 13, 21, 32, 33) back in the padded layout's order: the same here
    packed_order = packing.ids[packing.packed_positions(where)]
    assert packed_order[packing.reorder(where)].tolist() == ids[where].tolist()
    assert plan_packing(ids, torch.ones_like(mask)) is None  # full rows: nothing to save


def test_reorder_undoes_the_packed_order():
    # episode 1 is longer, so it goes first into the packed rows: packed order differs from the padded one
    ids = torch.tensor([[5, 6, 0, 0, 0, 0], [7, 8, 9, 10, 0, 0], [11, 0, 0, 0, 0, 0]])
    mask = (ids > 0).long()
    packing = plan_packing(ids, mask)
    where = mask.bool()
    assert packing.ids[packing.packed_positions(where)].tolist() != ids[where].tolist()
    assert packing.ids[packing.packed_positions(where)][packing.reorder(where)].tolist() == ids[where].tolist()


def padded_and_packed(agent, ids, mask, keep):
    with torch.no_grad():
        padded = agent(ids, mask, position_ids_from_mask(mask), logits_at=keep)
        packing = plan_packing(ids, mask)
        packed = agent(packing.ids, None, packing.position_ids, logits_at=packing.packed_positions(keep))
    return padded, packed, packing


def ragged_batch(vocab: int, seed: int = 0):
    """Six rows of left-padded prompts and responses of different lengths (one real run of tokens each)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 400), (6, 14), generator=generator)
    mask = torch.zeros_like(ids)
    for row, (start, end) in enumerate([(0, 14), (3, 9), (1, 5), (4, 14), (2, 7), (5, 8)]):
        mask[row, start:end] = 1
    keep = mask.bool() & (torch.rand(ids.shape, generator=generator) < 0.6)
    return ids, mask, keep


# OPT's decoder builds its causal mask without the position ids, so packed episodes would see each other
UNPACKABLE = {"opt"}


@pytest.mark.parametrize("family", sorted(UNPACKABLE))
def test_the_probe_finds_the_families_that_cannot_pack(family):
    agent = ActorCritic.from_models(tiny_causal_lm(family)).eval()
    with pytest.warns(UserWarning, match="does not keep packed sequences apart"):
        assert not packing_works(agent)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in UNPACKABLE])
def test_packed_forward_equals_padded_forward_in_every_family(family):
    agent = ActorCritic.from_models(tiny_causal_lm(family)).eval()
    assert packing_works(agent)
    ids, mask, keep = ragged_batch(agent.policy.config.vocab_size)
    padded, packed, packing = padded_and_packed(agent, ids, mask, keep)
    assert packing.ids.shape[0] < ids.shape[0]  # episodes really share rows
    torch.testing.assert_close(packed.logits[packing.reorder(keep)], padded.logits, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(packing.unpack(packed.values)[real], padded.values[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_forward_with_a_separate_critic(family):
    policy = tiny_causal_lm(family)
    agent = ActorCritic.from_models(policy, share_backbone=False, critic_init=tiny_causal_lm(family, seed=3)).eval()
    torch.nn.init.normal_(agent.value_head.weight)  # a zero head would hide a wrong critic forward
    ids, mask, keep = ragged_batch(policy.config.vocab_size, seed=1)
    padded, packed, packing = padded_and_packed(agent, ids, mask, keep)
    real = mask.bool()
    assert padded.values[real].abs().min() > 0
    torch.testing.assert_close(packing.unpack(packed.values)[real], padded.values[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.logits[packing.reorder(keep)], padded.logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def rollout_and_agent(make_vec):
    env = make_vec(16, autoreset_mode=AutoresetMode.DISABLED, max_new_tokens=12)
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=REWARD_MODEL_DIR)
    torch.nn.init.normal_(agent.value_head.weight, std=0.1)
    rollout = collect_rollout(agent.eval(), env, 1.0, seed=5, generator=torch.Generator().manual_seed(5))
    return rollout, agent


def test_packed_scores_and_gradients_equal_the_padded_ones(rollout_and_agent):
    rollout, agent = rollout_and_agent
    ids, attention, _, _ = crop_to_episodes(rollout)
    assert plan_packing(ids, attention) is not None  # this rollout does pack
    results = {}
    for pack in (True, False):
        agent.zero_grad(set_to_none=True)
        scored = score_rollout(agent, rollout, 0.8, pack=pack)
        loss = (scored.logprobs * rollout.mask).sum() + scored.values[:, :-1][rollout.mask].square().sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in agent.named_parameters() if p.grad is not None}
        results[pack] = scored, grads
    (packed, packed_grads), (padded, padded_grads) = results[True], results[False]
    taken = rollout.mask
    torch.testing.assert_close(packed.logprobs, padded.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed.entropy, padded.entropy, atol=1e-5, rtol=0)
    used = torch.arange(taken.shape[1] + 1) <= taken.sum(1, keepdim=True)  # V(s_0) .. V(s_len)
    torch.testing.assert_close(packed.values[used], padded.values[used], atol=1e-5, rtol=0)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) == len(list(agent.parameters()))
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


class Unpacked(ActorCritic):
    """An agent whose forward turns a missing mask into an all-ones one: packed sequences would see each other."""

    def forward(self, input_ids, attention_mask, position_ids, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return super().forward(input_ids, attention_mask, position_ids, **kwargs)


def test_a_model_that_mixes_packed_sequences_is_detected_and_runs_padded(rollout_and_agent):
    rollout, _ = rollout_and_agent
    policy = tiny_causal_lm("gpt2")
    agent = Unpacked(policy).eval()
    with pytest.warns(UserWarning, match="does not keep packed sequences apart"):
        assert not packing_works(agent)
    with torch.no_grad():
        assert torch.equal(
            score_rollout(agent, rollout, 1.0, pack=True).logprobs,
            score_rollout(agent, rollout, 1.0, pack=False).logprobs,
        )


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_packed_update_ends_at_the_padded_updates_weights(rollout_and_agent, algo):
    rollout, agent = rollout_and_agent
    start = copy.deepcopy(agent.state_dict())
    weights = {}
    for pack in (True, False):
        agent.load_state_dict(start)
        optimizer = torch.optim.Adam(agent.parameters(), lr=3e-4, eps=1e-5)
        config = PPOConfig(algo=algo, minibatch_size=8, micro_batch_size=4, pack_episodes=pack)
        ppo_update(agent.train(), optimizer, rollout, config, 1.0, torch.Generator().manual_seed(0), kl_coef=0.05)
        weights[pack] = {name: value.clone() for name, value in agent.state_dict().items()}
    agent.load_state_dict(start)
    moved = max(float((weights[True][k] - start[k]).abs().max()) for k in start)
    apart = max(float((weights[True][k] - weights[False][k]).abs().max()) for k in start)
    assert moved > 1e-4 and apart < 1e-3 * moved  # 16 Adam steps apart by float rounding only


def test_no_packed_position_exceeds_the_padded_layouts_width():
    # a model reads as many positions as the padded layout is wide; a packed row may be twice as wide, and the
    # filler after its last episode must restart its positions rather than count past the model's positions
    rng, long_fillers = random.Random(0), 0
    for _ in range(300):
        width, batch = rng.randint(3, 10), rng.randint(2, 12)
        lengths = torch.tensor([rng.randint(1, width) for _ in range(batch)])
        mask = (torch.arange(width) >= width - lengths[:, None]).long()  # left-padded
        packing = plan_packing(mask * 3, mask, filler=0)
        if packing is None:
            continue
        occupied = torch.zeros(packing.ids.numel(), dtype=torch.bool)
        occupied[packing.index[packing.real]] = True
        filler = (~occupied.view(packing.ids.shape)).sum(1)  # each row's cells after its last episode
        long_fillers += int((filler > width).sum())
        assert int(packing.position_ids.max()) < width
    assert long_fillers > 0  # some rows ended in more filler than the layout is wide
