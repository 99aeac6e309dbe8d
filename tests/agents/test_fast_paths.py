"""The update's fast paths compute what the plain ones did: fused GELU, logits only where an action is scored,
micro-batches cropped to their own episodes, the entropy's skipped zero backward, the plot off the training thread."""

import math

import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

from agents.logger import RunLogger
from agents.policy import ActorCritic, TanhGELU, add_embedding_rows_in_place, fuse_gelu
from agents.ppo import EntropyOfLogprobs, score_rollout
from agents.rollout import collect_rollout
from tests.models import tiny_causal_lm
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import entropy_from_logits, logprobs_from_logits, position_ids_from_mask, token_logprobs


def test_fused_gelu_is_gelu_new_to_float_rounding():
    x = torch.linspace(-12, 12, 1_000_001)
    fused, python = TanhGELU()(x), NewGELUActivation()(x)
    assert ((fused - python).abs() / x.abs().clamp(min=1)).max() <= 1.2e-7
    x64 = x.double()
    exact = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert (fused.double() - exact).abs().max() <= (python.double() - exact).abs().max() + 1e-12


def test_agent_runs_fused_gelu_and_matches_the_unswapped_model():
    agent = ActorCritic.from_models(POLICY_DIR)
    assert not any(isinstance(m, NewGELUActivation) for m in agent.modules())
    assert sum(isinstance(m, TanhGELU) for m in agent.modules()) == agent.policy.config.n_layer
    plain = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    assert fuse_gelu(AutoModelForCausalLM.from_pretrained(POLICY_DIR)) == plain.config.n_layer
    ids = torch.randint(3, 400, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    out = agent.eval()(ids, mask, position_ids_from_mask(mask))
    torch.testing.assert_close(out.logits, plain(input_ids=ids, attention_mask=mask).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("share_backbone", [True, False])
@pytest.mark.parametrize("through_logits_to_keep", [True, False])
def test_logits_at_gives_the_full_logits_at_those_positions(share_backbone, through_logits_to_keep):
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=REWARD_MODEL_DIR).eval()
    agent._logits_to_keep = through_logits_to_keep  # False: a model without logits_to_keep (full logits, indexed)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 400, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    keep = torch.rand(3, 10, generator=generator) < 0.5
    with torch.no_grad():
        full = agent(ids, mask, position_ids_from_mask(mask))
        some = agent(ids, mask, position_ids_from_mask(mask), logits_at=keep)
    assert some.logits.shape == (int(keep.sum()), full.logits.shape[-1])
    torch.testing.assert_close(some.logits, full.logits[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(some.values, full.values, atol=0, rtol=0)


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


def test_background_plot_writes_the_curve_and_close_waits_for_it(tmp_path):
    logger = RunLogger(tmp_path, start_iteration=0)
    for iteration in range(3):
        metrics = {"env/score": float(iteration), "env/kl": 0.1, "loss/value": 1.0, "policy/entropy": 2.0}
        logger.log(iteration, metrics, [])
        logger.plot(wait=False)
    logger.close()
    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not list(tmp_path.glob(".*.partial"))


def lookup_backward(model) -> list[str]:
    """The grad_fn names of the input embedding's outputs, recorded after every other forward hook."""
    names = []
    model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: names.append(type(out.grad_fn).__name__ if out.grad_fn else None)
    )
    return names


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_tied_embedding_rows_added_in_place_give_autograds_gradient_to_the_bit(family):
    overrides = {} if family == "gpt2" else {"tie_word_embeddings": True}
    plain, fast = (tiny_causal_lm(family, **overrides).eval() for _ in range(2))  # eval: dropout off
    assert add_embedding_rows_in_place(fast) and lookup_backward(fast) == []
    names = lookup_backward(fast)
    generator = torch.Generator().manual_seed(3)
    # repeated ids and the padding id 0 (Llama's embedding has padding_idx 0: that row gets no gradient)
    ids = torch.cat([torch.tensor([[0, 5, 5, 7, 0, 9]]), torch.randint(0, 20, (3, 6), generator=generator)])
    weights = torch.randn(4, 6, plain.config.vocab_size, generator=generator)
    grads = dict(plain.named_parameters())
    for micro_batch in range(2):  # the second accumulates into .grad
        for model in (plain, fast):
            (model(input_ids=ids).logits * weights).sum().backward()
        for name, parameter in fast.named_parameters():
            if micro_batch == 0:  # repeated ids summed in autograd's order: equal to the bit
                assert torch.equal(parameter.grad, grads[name].grad), name
            else:  # the head's gradient is added before the rows, not with them: float rounding apart
                torch.testing.assert_close(parameter.grad, grads[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    assert names == ["_RowsIntoGradientBackward"] * 2
    with torch.no_grad():
        fast(input_ids=ids)
    assert names[-1] is None  # no gradient, no custom lookup


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_untied_or_scaled_embeddings_keep_autograds_lookup(family):
    # Llama unties by default; Gemma's embedding is a subclass that scales its output
    assert not add_embedding_rows_in_place(tiny_causal_lm(family))


def test_a_policy_prepared_twice_keeps_one_in_place_lookup():
    model = tiny_causal_lm("gpt2")
    assert add_embedding_rows_in_place(model) and add_embedding_rows_in_place(model)
    ActorCritic.from_models(model)  # wraps the same module again
    assert len(model.get_input_embeddings()._forward_hooks) == 1


def test_a_frozen_tied_embedding_keeps_autograds_lookup():
    model = tiny_causal_lm("gpt2")
    assert add_embedding_rows_in_place(model)
    names = lookup_backward(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    model(input_ids=torch.tensor([[3, 4, 5]])).logits.sum().backward()
    assert names == [None] and model.get_input_embeddings().weight.grad is None
