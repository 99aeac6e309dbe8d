"""agents/policy.py: the actor-critic leaves a model handed to it as it was (but for dropout), its gradients are
autograd's, it trains float32 master weights, and its fast paths compute what the plain ones did: the fused GELU
(torch's kernel for GPT-2's ``gelu_new``, through the config), logits only at the positions asked for, the tied
embedding's sparse gradient, a vocabulary-sized head's logits in blocks."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.activations import ACT2FN, NewGELUActivation

from agents.policy import ActorCritic, critic_trunk, load_policy, sparse_lookup_applies
from agents.train import TrainConfig, build_agent
from tests.models import tiny_causal_lm
from textenv import vocabulary
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR
from textenv.lm import position_ids_from_mask

DROPOUT_WORDS = ("dropout", "pdrop", "layerdrop")


def hooks(model: torch.nn.Module) -> dict[str, list]:
    """Every hook registered on ``model``'s modules and parameters, by module or parameter name."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    found = {
        name: [h for kind in kinds for h in getattr(module, kind).values()] for name, module in model.named_modules()
    }
    for name, parameter in model.named_parameters():
        found[name] = list((parameter._backward_hooks or {}).values()) + list(
            (getattr(parameter, "_post_accumulate_grad_hooks", None) or {}).values()
        )
    return found


def exercise(agent: ActorCritic) -> None:
    """A cached rollout step, a re-score and an update's forward and backward (the sparse lookup asked for)."""
    ids = torch.tensor([[3, 4, 5, 4, 6], [7, 7, 8, 9, 3]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = agent(ids, mask, position_ids_from_mask(mask), use_cache=True)
        agent(ids[:, -1:], torch.ones(2, 6, dtype=torch.long), torch.full((2, 1), 5), out.past_key_values, True)
        agent(ids, mask, position_ids_from_mask(mask))
    out = agent(ids, mask, position_ids_from_mask(mask), sparse_embedding_grad=True)
    (out.logits.logsumexp(-1).sum() + out.values.sum()).backward()


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("share_backbone", [True, False])
def test_from_models_leaves_the_model_as_it_was_but_for_its_dropout(family, share_backbone):
    model = tiny_causal_lm(family, **({} if family == "gpt2" else {"tie_word_embeddings": True}))
    with torch.no_grad():  # transformers installs its own hooks for output_hidden_states on the first such call
        model(input_ids=torch.tensor([[3, 4]]), output_hidden_states=True)
    modules = [(name, type(module)) for name, module in model.named_modules()]
    parameters = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    config, registered = model.config.to_dict(), hooks(model)
    assert not model._forward_hooks and not model.get_input_embeddings()._forward_hooks

    agent = ActorCritic.from_models(model, share_backbone=share_backbone)
    exercise(agent.train())

    assert agent.policy is model
    assert [(name, type(module)) for name, module in model.named_modules()] == modules  # no module swapped
    assert hooks(model) == registered  # none registered, on any module or parameter
    assert not model._forward_hooks and not model.get_input_embeddings()._forward_hooks
    now = dict(model.named_parameters())
    assert now.keys() == parameters.keys()
    assert all(now[name] is p and torch.equal(p, value) for name, (p, value) in parameters.items())
    # the config too, but for the dropout rates, which the agent turns off (tiny_causal_lm sets every one nonzero)
    changed = {key for key, value in model.config.to_dict().items() if config.get(key) != value}
    assert changed and all(any(word in key for word in DROPOUT_WORDS) for key in changed), changed
    assert all(model.config.to_dict()[key] == 0.0 for key in changed)
    assert model.config.to_dict().keys() == config.keys()


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen3"])
@pytest.mark.parametrize("sparse_embedding_grad", [False, True])
def test_autograd_grad_of_an_agents_loss_is_the_plain_models_gradient(family, sparse_embedding_grad):
    """``torch.autograd.grad`` returns autograd's gradient and writes no ``.grad``, whatever the forward was asked."""
    model = tiny_causal_lm(family, **({"tie_word_embeddings": True} if family == "qwen3" else {}))
    plain = copy.deepcopy(model)
    agent = ActorCritic.from_models(model).train()
    plain.load_state_dict(model.state_dict())
    plain.eval()  # the agent's dropout is off: the plain model's too
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([[0, 5, 5, 7, 0, 9]]), torch.randint(0, 30, (2, 6), generator=generator)])
    mask, weights = torch.ones_like(ids), torch.randn(3, 6, model.config.vocab_size, generator=generator)
    positions = position_ids_from_mask(mask)

    logits = agent(ids, mask, positions, sparse_embedding_grad=sparse_embedding_grad).logits
    grads = torch.autograd.grad((logits * weights).sum(), list(agent.policy.parameters()))
    assert all(p.grad is None for p in agent.parameters())
    plain_logits = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    expected = torch.autograd.grad((plain_logits * weights).sum(), list(plain.parameters()))
    assert len(grads) == len(expected)
    for grad, want in zip(grads, expected):
        assert grad.layout == torch.strided and torch.equal(grad, want)


def test_a_checkpoint_saved_in_bf16_trains_in_float32(tmp_path):
    """The agent's weights are the master weights: float32, whatever dtype the checkpoint holds (bf16 would lose
    updates smaller than its resolution); bf16 is for autocast's forwards."""
    tiny_causal_lm("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_policy(tmp_path / "bf16").dtype == torch.float32
    assert {p.dtype for p in critic_trunk(tmp_path / "bf16").parameters()} == {torch.float32}


# --------------------------------------------------------------------------- the fused GELU
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


# --------------------------------------------------------------------------- logits_at
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


# --------------------------------------------------------------------------- sparse gradient
def tied(family: str) -> torch.nn.Module:
    return tiny_causal_lm(family, **({} if family in ("gpt2", "opt") else {"tie_word_embeddings": True}))


def accumulated_gradients(
    agent: ActorCritic, sparse: bool, micro_batches: int = 3, autocast: bool = False
) -> dict[str, torch.Tensor]:
    """Gradients of a loss of logits and values, accumulated over micro-batches by ``backward``, as the update does
    (its forwards under bf16 autocast with ``autocast``)."""
    generator = torch.Generator().manual_seed(3)
    vocab = agent.policy.config.vocab_size
    agent.zero_grad(set_to_none=True)
    for _ in range(micro_batches):
        # repeated ids and the padding id 0 (Llama's and OPT's embedding has padding_idx 0: that row gets no gradient)
        ids = torch.cat([torch.tensor([[0, 5, 5, 7, 0, 9]]), torch.randint(0, 20, (3, 6), generator=generator)])
        mask = torch.ones_like(ids)
        keep = torch.rand(4, 6, generator=generator) < 0.7
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = agent(ids, mask, position_ids_from_mask(mask), logits_at=keep, sparse_embedding_grad=sparse)
        weights = torch.randn(out.logits.shape[0], vocab, generator=generator)
        ((out.logits.float() * weights).sum() + out.values.sum()).backward()
    return {name: p.grad.clone() for name, p in agent.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen3"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_tied_embeddings_sparse_gradient_is_autograds_to_the_bit(family, autocast, request):
    if autocast:  # bf16 kernels, native or emulated (tests/conftest.py)
        request.getfixturevalue("bf16_cpu")
    agent = ActorCritic.from_models(tied(family)).train()
    assert sparse_lookup_applies(agent.policy)
    dense, sparse = (accumulated_gradients(agent, flag, autocast=autocast) for flag in (False, True))
    assert dense.keys() == sparse.keys()
    for name, grad in dense.items():  # repeated ids summed in autograd's order, every micro-batch
        assert sparse[name].layout == torch.strided and torch.equal(sparse[name], grad), name
    ids = torch.tensor([[3, 4, 5, 4]])
    mask, positions = torch.ones_like(ids), torch.arange(4)[None]
    with_rows, without = (agent(ids, mask, positions, sparse_embedding_grad=flag).logits for flag in (True, False))
    assert torch.equal(with_rows, without)
    assert {"SparseRowsLookupBackward", "TiedHeadBackward"} <= backward_nodes(with_rows)
    assert not {"SparseRowsLookupBackward", "TiedHeadBackward"} & backward_nodes(without)
    assert "forward" not in vars(agent.policy.get_output_embeddings())  # the head is itself again after the forward
    with torch.no_grad():  # nothing to backpropagate: the request is ignored
        assert torch.equal(agent(ids, mask, positions, sparse_embedding_grad=True).logits, without)


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_the_tied_matrix_gets_one_gradient_and_no_vocabulary_sized_copy(family):
    """The head's gradient of the tied matrix takes the looked-up rows in place and becomes the weight's gradient:
    no out-of-place sum of the two (autograd adds a sparse gradient to a dense one by copying the dense one), and
    the first micro-batch's ``.grad`` is that very tensor."""
    agent = ActorCritic.from_models(tied(family)).train()
    weight = agent.policy.get_input_embeddings().weight
    ids = torch.tensor([[3, 4, 5, 4, 6, 7]])
    mask = torch.ones_like(ids)
    out = agent(ids, mask, position_ids_from_mask(mask), sparse_embedding_grad=True)
    made = []
    weight.register_hook(lambda grad: made.append(grad.data_ptr()))  # the one gradient, before it is accumulated
    with torch.profiler.profile(record_shapes=True) as profile:
        out.logits.logsumexp(-1).sum().backward()
    vocabulary_sized = [event.name for event in profile.events() if list(weight.shape) in event.input_shapes]
    assert not {"aten::add", "aten::copy_", "aten::clone"} & set(vocabulary_sized), vocabulary_sized
    assert made == [weight.grad.data_ptr()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_vocabulary_sized_head_in_blocks_gives_autograds_gradients_to_the_bit(family, monkeypatch):
    """The update's forward with a head of two blocks or more (``textenv.vocabulary``): GPT-2's tied head runs as
    ``TiedHead``, Llama's untied one as ``VocabularyLinear``; every gradient is plain autograd's, without blocks."""
    agent = ActorCritic.from_models(tiny_causal_lm(family, vocab_size=2 * vocabulary.BLOCK + 37)).train()
    ids = torch.tensor([[3, 4, 5, 2080]])
    with torch.profiler.profile(record_shapes=True) as profile:
        agent(ids, torch.ones_like(ids), torch.arange(4)[None], sparse_embedding_grad=True)
    blocks = [e for e in profile.events() if e.name == "aten::mm" and e.input_shapes[1][-1] == vocabulary.BLOCK]
    assert len(blocks) == 2  # the third block is a short one
    ours = accumulated_gradients(agent, sparse=True)
    monkeypatch.setattr(vocabulary, "BLOCK", 10**9)  # no vocabulary of two blocks: torch's products, autograd's
    plain = accumulated_gradients(agent, sparse=False)
    assert ours.keys() == plain.keys()
    for name, grad in plain.items():
        assert torch.equal(ours[name], grad), name


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
