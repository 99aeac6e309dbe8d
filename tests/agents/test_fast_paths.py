"""The update's fast paths compute what the plain ones did: fused GELU, logits only where an action is scored,
micro-batches cropped to their own episodes, the entropy's skipped zero backward, the tied embedding's sparse
gradient, the plot off the training thread."""

import copy
import math

import pytest
import torch
from gymnasium.vector import AutoresetMode
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.activations import ACT2FN, NewGELUActivation

from agents.logger import RunLogger
from agents.policy import ActorCritic, sparse_lookup_applies
from agents.ppo import EntropyOfLogprobs, PPOConfig, ppo_update, score_rollout
from agents.rollout import collect_rollout
from agents.train import TrainConfig, build_agent
from tests.models import tiny_causal_lm
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import (
    disable_dropout,
    entropy_from_logits,
    logprobs_from_logits,
    position_ids_from_mask,
    token_logprobs,
)


def test_fused_gelu_is_gelu_new_to_float_rounding():
    x = torch.linspace(-12, 12, 1_000_001)
    fused, python = ACT2FN["gelu_pytorch_tanh"](x), NewGELUActivation()(x)
    assert torch.equal(fused, F.gelu(x, approximate="tanh"))  # transformers' name for torch's fused kernel
    assert ((fused - python).abs() / x.abs().clamp(min=1)).max() <= 1.2e-7
    x64 = x.double()
    exact = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    assert (fused.double() - exact).abs().max() <= (python.double() - exact).abs().max() + 1e-12


class TanhGELUByHand(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def tanh_gelu_by_hand(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every ``gelu_new`` module swapped for torch's fused tanh GELU: what the agent ran before it
    fused through the config. The test's own model; the library swaps no module."""
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = TanhGELUByHand()
    return model


def fused_and_by_hand(agent: ActorCritic, source) -> tuple[torch.Tensor, torch.Tensor]:
    plain = tanh_gelu_by_hand(AutoModelForCausalLM.from_pretrained(source)).eval()
    ids = torch.randint(3, 400, (4, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = agent.eval()(ids, mask, position_ids_from_mask(mask))
        return out.logits, plain(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


@pytest.mark.parametrize("share_backbone", [True, False])
def test_an_agent_that_loads_its_models_runs_the_fused_gelu_of_their_configs(share_backbone):
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=share_backbone, critic_init=REWARD_MODEL_DIR)
    trunks = [agent.policy] + ([] if share_backbone else [agent.critic])
    assert all(trunk.config.activation_function == "gelu_pytorch_tanh" for trunk in trunks)
    assert not any(isinstance(m, NewGELUActivation) for m in agent.modules())
    logits, by_hand = fused_and_by_hand(agent, POLICY_DIR)
    assert torch.equal(logits, by_hand)  # the same kernel as the module swap it replaced: the same bits
    plain = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()  # gelu_new: float rounding apart
    ids = torch.randint(3, 400, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits, plain(input_ids=ids).logits, atol=2e-5, rtol=0)


def test_the_trainers_agent_runs_the_fused_gelu_bit_for_bit_as_before():
    config = TrainConfig()
    agent = build_agent(config, None, torch.device("cpu"))
    assert agent.policy.config.activation_function == "gelu_pytorch_tanh"
    logits, by_hand = fused_and_by_hand(agent, POLICY_DIR)
    assert torch.equal(logits, by_hand)


def test_a_critic_built_from_a_model_is_fused_and_leaves_the_model_alone():
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    agent = ActorCritic.from_models(POLICY_DIR, share_backbone=False, critic_init=reward_model)
    assert agent.critic.config.activation_function == "gelu_pytorch_tanh"
    assert reward_model.config.activation_function == "gelu_new"
    assert all(isinstance(block.mlp.act, NewGELUActivation) for block in reward_model.transformer.h)


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


def tied(family: str) -> torch.nn.Module:
    return tiny_causal_lm(family, **({} if family in ("gpt2", "opt") else {"tie_word_embeddings": True}))


def accumulated_gradients(agent: ActorCritic, sparse: bool, micro_batches: int = 3) -> dict[str, torch.Tensor]:
    """Gradients of a loss of logits and values, accumulated over micro-batches by ``backward``, as the update does."""
    generator = torch.Generator().manual_seed(3)
    vocab = agent.policy.config.vocab_size
    agent.zero_grad(set_to_none=True)
    for _ in range(micro_batches):
        # repeated ids and the padding id 0 (Llama's and OPT's embedding has padding_idx 0: that row gets no gradient)
        ids = torch.cat([torch.tensor([[0, 5, 5, 7, 0, 9]]), torch.randint(0, 20, (3, 6), generator=generator)])
        mask = torch.ones_like(ids)
        keep = torch.rand(4, 6, generator=generator) < 0.7
        out = agent(ids, mask, position_ids_from_mask(mask), logits_at=keep, sparse_embedding_grad=sparse)
        weights = torch.randn(out.logits.shape[0], vocab, generator=generator)
        ((out.logits * weights).sum() + out.values.sum()).backward()
    return {name: p.grad.clone() for name, p in agent.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen3"])
def test_the_tied_embeddings_sparse_gradient_is_autograds_to_the_bit(family):
    agent = ActorCritic.from_models(tied(family)).train()
    assert sparse_lookup_applies(agent.policy)
    dense, sparse = (accumulated_gradients(agent, flag) for flag in (False, True))
    assert dense.keys() == sparse.keys()
    for name, grad in dense.items():  # repeated ids summed in autograd's order, every micro-batch
        assert sparse[name].layout == torch.strided and torch.equal(sparse[name], grad), name
    ids = torch.tensor([[3, 4, 5, 4]])
    mask, positions = torch.ones_like(ids), torch.arange(4)[None]
    with_rows, without = (agent(ids, mask, positions, sparse_embedding_grad=flag).logits for flag in (True, False))
    assert torch.equal(with_rows, without)
    assert "SparseRowsLookupBackward" in backward_nodes(with_rows)
    assert "SparseRowsLookupBackward" not in backward_nodes(without)
    with torch.no_grad():  # nothing to backpropagate: the request is ignored
        assert torch.equal(agent(ids, mask, positions, sparse_embedding_grad=True).logits, without)


def backward_nodes(output: torch.Tensor) -> set[str]:
    """The class names of the autograd graph's nodes behind ``output``."""
    names, stack, seen = set(), [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("family", ["llama", "gemma", "frozen"])
def test_untied_scaled_or_frozen_embeddings_keep_autograds_lookup(family):
    # Llama unties by default; Gemma's embedding is a subclass that scales its output; a frozen one has no gradient
    model = tied("gpt2") if family == "frozen" else tiny_causal_lm(family)
    if family == "frozen":
        model.get_input_embeddings().weight.requires_grad_(False)
    agent = ActorCritic.from_models(model).train()
    assert not sparse_lookup_applies(agent.policy)
    ids = torch.tensor([[3, 4, 5, 4]])
    logits = agent(ids, torch.ones_like(ids), torch.arange(4)[None], sparse_embedding_grad=True).logits
    assert "SparseRowsLookupBackward" not in backward_nodes(logits)
    dense, asked = (accumulated_gradients(agent, flag, micro_batches=1) for flag in (False, True))
    assert all(torch.equal(asked[name], grad) for name, grad in dense.items())  # the flag was ignored


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


def test_fused_adam_steps_as_the_per_tensor_loop_does():
    """The trainer's ``Adam(fused=True)``: one kernel over every parameter, the same update to float rounding."""
    agent = ActorCritic.from_models(POLICY_DIR)
    start = [p.detach().clone() for p in agent.parameters()]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(3)]
    weights = []
    for options in ({"fused": True}, {"foreach": False}):
        model = copy.deepcopy(agent)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, eps=1e-5, **options)
        for step in gradients:
            for parameter, gradient in zip(model.parameters(), step):
                parameter.grad = gradient.clone()
            optimizer.step()
        weights.append([p.detach() for p in model.parameters()])
    moved = max(float((p - q).abs().max()) for p, q in zip(weights[0], start))
    apart = max(float((p - q).abs().max()) for p, q in zip(*weights))
    assert moved > 5e-4 and apart <= 1e-4 * moved, (moved, apart)  # apart by a rounding of the weights (1.5e-8)
