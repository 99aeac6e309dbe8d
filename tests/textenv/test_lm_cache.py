"""textenv/lm.py's preallocated KV cache: ``PreallocatedLayer`` against concatenation, and ``CachedStepper`` with it
against the growing ``DynamicLayer`` cache, to the bit, on every architecture family of ``tests.models`` (full-attention
caches move into buffers; sliding-window and mixed caches keep transformers' layers)."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer

from tests.models import FAMILIES, tiny_causal_lm, tiny_reward_model
from textenv.default_task import POLICY_DIR
from textenv.lm import CachedStepper, PreallocatedLayer, pad_batch

SLIDING = {"gemma2", "gemma3", "mistral", "mistral_short"}  # a sliding-window layer in the cache: rebuilt, never edited


def random_kv(generator, batch=3, heads=2, width=4, dim=5):
    return tuple(torch.randn(batch, heads, width, dim, generator=generator) for _ in range(2))


def test_preallocated_layer_matches_concatenation_and_reallocates_only_when_full():
    generator = torch.Generator().manual_seed(0)
    keys, values = random_kv(generator)
    layer = PreallocatedLayer(keys, values, capacity=6)
    expected = [keys, values]
    buffer = layer.key_buffer.data_ptr()
    for _ in range(2):  # within the capacity: written in place
        new = random_kv(generator, width=1)
        got = layer.update(*new)
        expected = [torch.cat([old, add], dim=2) for old, add in zip(expected, new)]
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert layer.key_buffer.data_ptr() == buffer and layer.capacity == 6 and layer.get_seq_length() == 6

    layer.drop(2)  # forget two leading columns, then run past the buffer's end: a new one, twice the width needed
    expected = [e[:, :, 2:] for e in expected]
    new = random_kv(generator, width=1)
    got = layer.update(*new)
    expected = [torch.cat([old, add], dim=2) for old, add in zip(expected, new)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert layer.key_buffer.data_ptr() != buffer and layer.capacity == 10 and (layer.start, layer.end) == (0, 5)

    layer.drop(3)
    layer.widen(2)  # room on the left: no new buffer
    buffer = layer.key_buffer.data_ptr()
    expected = [torch.cat([torch.zeros(3, 2, 2, 5), e[:, :, 3:]], dim=2) for e in expected]
    assert torch.equal(layer.keys, expected[0]) and torch.equal(layer.values, expected[1])
    assert layer.key_buffer.data_ptr() == buffer
    layer.widen(4)  # no room left of the span: a new buffer with the zeros in front
    expected = [torch.cat([torch.zeros(3, 2, 4, 5), e], dim=2) for e in expected]
    assert torch.equal(layer.keys, expected[0]) and torch.equal(layer.values, expected[1])
    assert layer.capacity == 16 and (layer.start, layer.end) == (0, 8)


def step_through_restarts(stepper: CachedStepper, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Prefill three rows, then steps where rows wait, restarts of one row on a shorter and on a longer prompt, and
    an ``extend``; returns ``last`` after every call."""
    generator = torch.Generator().manual_seed(seed)

    def prompt(length):
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    contexts = [prompt(5), prompt(2), prompt(7)]
    outputs = [stepper.prefill(*pad_batch(contexts, 0)).clone()]
    for step in range(14):
        live = torch.rand(3, generator=generator) > 0.25
        outputs.append(stepper.advance(torch.randint(3, vocab, (3,), generator=generator), live).clone())
        if step in (3, 8):  # a short prompt, then one longer than the whole cache (it widens on the left)
            row, new = step % 3, [prompt(3), prompt(30)][step == 8]
            contexts[row] = new
            stepper.start_rows(torch.tensor([row]), *pad_batch([new], 0), lambda: contexts)
            outputs.append(stepper.last.clone())
    outputs.append(stepper.extend({0: prompt(3), 2: prompt(1)}).clone())
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scores", [False, True], ids=["lm", "reward_model"])
@torch.no_grad()
def test_preallocated_cache_gives_the_growing_caches_numbers_to_the_bit(family, scores):
    model = tiny_reward_model(family) if scores else tiny_causal_lm(family)
    vocab = model.config.vocab_size
    grown = step_through_restarts(CachedStepper(model, 0, scores=scores, preallocate=False), vocab)
    for room in (None, 0, 40):
        stepper = CachedStepper(model, 0, scores=scores, room=room)
        assert all(torch.equal(a, b) for a, b in zip(grown, step_through_restarts(stepper, vocab)))
        layers = {type(layer) for layer in stepper.cache.layers}
        if family in SLIDING:
            assert not stepper.editable and PreallocatedLayer not in layers  # transformers' own layers
        else:
            assert stepper.editable and layers == {PreallocatedLayer}


@torch.no_grad()
def test_default_task_policy_steps_in_one_buffer_per_layer_with_room_for_the_episode():
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    vocab, new_tokens = model.config.vocab_size, 32
    prompts = pad_batch([[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]], 0)
    steppers = [CachedStepper(model, 0, preallocate=False), CachedStepper(model, 0, room=new_tokens)]
    for stepper in steppers:
        stepper.prefill(*prompts)
    buffers = [layer.key_buffer.data_ptr() for layer in steppers[1].cache.layers]
    generator = torch.Generator().manual_seed(0)
    for _ in range(new_tokens):
        tokens = torch.randint(3, vocab, (3,), generator=generator)
        grown, preallocated = (stepper.advance(tokens) for stepper in steppers)
        assert torch.equal(grown, preallocated)
    assert [layer.key_buffer.data_ptr() for layer in steppers[1].cache.layers] == buffers  # never reallocated
    assert all(type(layer) is DynamicLayer for layer in steppers[0].cache.layers)


def test_stepping_records_no_graph_even_with_grad_enabled():
    policy = tiny_causal_lm("llama")  # trainable parameters, stepped outside no_grad as the env's reset does
    stepper = CachedStepper(policy, 0)
    stepper.prefill(*pad_batch([[5, 6, 7], [8, 9]], 0))
    stepper.advance(torch.tensor([10, 11]))
    stepper.start_rows(torch.tensor([1]), *pad_batch([[12, 13, 14, 15]], 0), lambda: [[5, 6, 7, 10], [12, 13, 14, 15]])
    assert not stepper.last.requires_grad
    assert not any(layer.keys.requires_grad for layer in stepper.cache.layers)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_reply_in_one_forward_gives_what_a_column_at_a_time_gives(family):
    """``extend`` (one forward for a full-attention cache) against ``advance`` column by column with the same
    masked pads: the same mask and positions, the same outputs after it and after a step more."""
    model = tiny_causal_lm(family)
    generator = torch.Generator().manual_seed(1)
    contexts = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 2, 7, 4)]
    replies = {0: [7, 8], 2: [9, 10, 11, 12], 3: [13]}  # row 1: no reply
    block, columns = CachedStepper(model, 0, room=16), CachedStepper(model, 0, room=16)
    for stepper in (block, columns):
        stepper.prefill(*pad_batch(contexts, 0))
    after_block = block.extend(replies).clone()
    for column in range(4):
        tokens = torch.tensor(
            [replies.get(row, [])[column] if column < len(replies.get(row, [])) else 0 for row in range(4)]
        )
        columns.advance(tokens, torch.tensor([column < len(replies.get(row, [])) for row in range(4)]))
    torch.testing.assert_close(after_block, columns.last, atol=1e-5, rtol=1e-5)
    assert torch.equal(block.mask, columns.mask) and torch.equal(block.position, columns.position)
    step = torch.tensor([20, 21, 22, 23])
    torch.testing.assert_close(block.advance(step), columns.advance(step), atol=1e-5, rtol=1e-5)
    assert block.editable == (family not in SLIDING)  # sliding-window caches take the column loop


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_reading_a_forwards_cache_logs_no_deprecation(family, use_cache, monkeypatch):
    import transformers.utils.generic as generic

    from textenv.lm import output_cache

    said = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *args, **kwargs: said.append(message))
    trunk = tiny_causal_lm(family).base_model  # a separate critic's trunk: its output has no logits
    out = trunk(input_ids=torch.tensor([[3, 4, 5]]), use_cache=use_cache)
    cache = output_cache(out)
    assert (cache is not None) == use_cache
    assert said == []  # reading `out.past_key_values` (the cache absent) logged "... are deprecated"
