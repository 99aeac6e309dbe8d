"""The actor-critic leaves a model handed to it as it was (but for dropout), its gradients are autograd's, and it
trains float32 master weights."""

import copy

import pytest
import torch

from agents.policy import ActorCritic, critic_trunk, load_policy
from tests.models import tiny_causal_lm
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
