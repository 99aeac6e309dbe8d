"""textenv/vocabulary.py: an LM head's product in vocabulary blocks gives torch's floats to the bit (forward and
gradients), only where it is meant to run (float32 on the CPU outside autocast, a vocabulary of two blocks or more),
and models run through it (``blocked_head``, the KV-cached stepper) give the logits of their plain forward."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import tiny_causal_lm
from textenv import vocabulary
from textenv.lm import CachedStepper, position_ids_from_mask
from textenv.vocabulary import (
    BLOCK,
    VocabularyLinear,
    blocked,
    blocked_head,
    head_linear,
    vocabulary_head,
    vocabulary_linear,
)

VOCABULARY = 2 * BLOCK + 37  # three blocks, the last a short one


def mm_calls(run) -> list[list[int]]:
    """The input shapes of every ``aten::mm`` that ``run()`` makes."""
    with torch.profiler.profile(record_shapes=True) as profile:
        run()
    return [event.input_shapes for event in profile.events() if event.name == "aten::mm"]


@pytest.mark.parametrize(
    ("rows", "width", "vocab"),
    [(2, 64, 2 * BLOCK), (3, 32, VOCABULARY), (16, 768, 50257), (128, 768, 50257), (257, 96, 5000)],
)
def test_the_blocked_logits_are_torchs_to_the_bit(rows, width, vocab):
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(2, rows + 2, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * 0.02
    x = hidden[0, :rows]
    assert blocked(x, weight)
    shapes = mm_calls(lambda: vocabulary_linear(x, weight))
    assert len(shapes) == math.ceil(vocab / BLOCK)  # it really ran in blocks
    assert shapes[0] == [[rows, width], [width, BLOCK]]
    layouts = {  # torch picks its kernel by the input's layout, and so does each block
        "rows": x,
        "batch": hidden,
        "last column": hidden[:, -1:],
        "every other column": hidden[:, ::2],
        "transposed": hidden.transpose(0, 1),
        "expanded": x[None].expand(3, -1, -1),
    }
    for name, layout in layouts.items():
        assert torch.equal(vocabulary_linear(layout, weight), F.linear(layout, weight)), name


def test_vocabulary_linears_gradients_are_autograds_to_the_bit():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=generator)
    weight = torch.randn(VOCABULARY, 48, generator=generator) * 0.02
    upstream = torch.randn(2, 5, VOCABULARY, generator=generator)
    results = []
    for linear in (F.linear, VocabularyLinear.apply):
        leaf_x, leaf_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear(leaf_x, leaf_w)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf_x.grad, leaf_w.grad))
    for plain, ours in zip(*results):
        assert torch.equal(plain, ours)
    # head_linear picks the differentiable one where a gradient is wanted, the plain blocks where none is
    leaf = x.clone().requires_grad_()
    assert head_linear(leaf, weight).grad_fn.name() == "VocabularyLinearBackward"
    with torch.no_grad():
        assert torch.equal(head_linear(leaf, weight), F.linear(x, weight))


def test_only_float32_on_the_cpu_outside_autocast_with_two_blocks_and_two_rows_is_blocked():
    x, weight = torch.randn(4, 8), torch.randn(2 * BLOCK, 8)
    assert blocked(x, weight)
    assert not blocked(x, weight[: 2 * BLOCK - 1])  # one block and a bit: torch's product as it is
    assert not blocked(x[:1], weight) and not blocked(x[:1, None], weight)  # one row: a matrix-vector product
    assert blocked(x[:2], weight)
    assert not blocked(x.bfloat16(), weight.bfloat16())
    assert not blocked(x.double(), weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the operands: its own product
        assert not blocked(x, weight)
        assert len(mm_calls(lambda: head_linear(x, weight))) <= 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_a_model_under_blocked_head_gives_its_own_logits_and_gradients(family):
    """GPT-2 ties its head to the embedding, Llama does not, Gemma scales its embedding: the logits and every
    gradient are the plain forward's, and the head is itself again afterwards."""
    model = tiny_causal_lm(family, vocab_size=VOCABULARY)
    head = model.get_output_embeddings()
    ids = torch.tensor([[3, 4, 5, 2000, 2080], [7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)

    def run(blocks: bool):
        model.zero_grad(set_to_none=True)
        with blocked_head(vocabulary_head(model)) if blocks else torch.autocast("cpu", enabled=False):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    (plain, plain_grads), (ours, our_grads) = run(False), run(True)
    assert torch.equal(plain, ours)
    assert plain_grads.keys() == our_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(grad, our_grads[name]), name
    assert "forward" not in vars(head)
    with blocked_head(vocabulary_head(model)):
        assert "forward" in vars(head)
        with torch.no_grad():
            shapes = mm_calls(lambda: model(input_ids=ids))
    assert sum(shape[1][1] == BLOCK for shape in shapes) == math.ceil(VOCABULARY / BLOCK) - 1


def test_heads_it_does_not_know_run_as_they_are():
    model = tiny_causal_lm("gpt2", vocab_size=VOCABULARY)
    model.lm_head = nn.Linear(model.config.n_embd, VOCABULARY, bias=True)  # a bias: not a plain head
    assert vocabulary_head(model) is None
    assert vocabulary_head(tiny_causal_lm("gpt2")) is None  # 446 tokens: less than two blocks
    assert vocabulary.plain_head(nn.Module()) is None  # no get_output_embeddings at all
    with blocked_head(None):
        pass


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_stepper_runs_the_head_in_blocks_and_gives_the_plain_forwards_logits(family):
    model = tiny_causal_lm(family, vocab_size=VOCABULARY)
    stepper = CachedStepper(model, pad_token_id=0)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 2007]])
    mask = (ids != 0).long()
    shapes = mm_calls(lambda: stepper.prefill(ids, mask))
    assert sum(shape[1][1] == BLOCK for shape in shapes) == math.ceil(VOCABULARY / BLOCK) - 1
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert torch.equal(stepper.last, plain[:, -1])
    assert "forward" not in vars(model.get_output_embeddings())
