"""textenv/lm.py: padding helpers and probabilities against hand-worked numbers, sampling against torch.multinomial
and model.generate with the same seed, the KV-cached stepper
against plain uncached forwards of a tiny random GPT-2, a reward model's score read at the last real token, and
the refusal of a model whose KV cache is not a DynamicCache."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tests.models import tiny_gpt2_reward_model
from textenv.default_task import POLICY_DIR
from textenv.lm import (
    CachedStepper,
    crop_left_padding,
    entropy_from_logits,
    exponential_draws,
    pad_batch,
    position_ids_from_mask,
    sample,
    sample_tokens,
    sequence_scores,
    to_left_padding,
    token_logprobs,
)

INF = float("inf")


def long(rows):
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------- padding
def test_position_ids_count_real_tokens_from_zero():
    left = long([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    # right padding: the real tokens get the same positions as when left-padded
    right = long([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    positions = position_ids_from_mask(right)
    assert positions[0, :3].tolist() == [0, 1, 2] and positions[1, :1].tolist() == [0]


def test_pad_batch_left_and_right():
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 4]], pad_token_id=0)  # left by default
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8], [9, 4]], pad_token_id=3, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 3, 3], [9, 4, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_crop_left_padding_drops_only_columns_that_are_padding_in_every_row():
    ids = long([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]])
    mask = long([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    cropped_ids, cropped_mask = crop_left_padding(ids, mask)
    assert cropped_ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert cropped_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    # nothing to drop when some row starts at column 0
    same_ids, same_mask = crop_left_padding(long([[1, 2], [0, 3]]), long([[1, 1], [0, 1]]))
    assert same_ids.tolist() == [[1, 2], [0, 3]] and same_mask.tolist() == [[1, 1], [0, 1]]


def test_to_left_padding_moves_real_tokens_to_the_right_end_and_fills_pads():
    ids = long([[5, 6, 7, 99], [8, 99, 99, 99], [99, 9, 4, 99], [1, 2, 3, 4]])
    mask = long([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]])
    left_ids, left_mask = to_left_padding(ids, mask, pad_token_id=0)
    assert left_ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 9, 4], [1, 2, 3, 4]]
    assert left_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_to_left_padding_moves_real_tokens_to_the_end():
    ids, mask = pad_batch([[1, 2], [3, 4, 5, 6]], pad_token_id=0, side="right")
    left_ids, left_mask = to_left_padding(ids, mask, pad_token_id=0)
    assert left_ids.tolist() == [[0, 0, 1, 2], [3, 4, 5, 6]]
    assert left_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert position_ids_from_mask(left_mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# --------------------------------------------------------------------------- probabilities
def test_token_logprobs_at_a_temperature():
    # logits [ln 16, ln 4, ln 4]: softmax = [16, 4, 4] / 24; at temperature 2, [ln 4, ln 2, ln 2]: [4, 2, 2] / 8
    logits = torch.tensor([[math.log(16), math.log(4), math.log(4)]] * 2)
    tokens = long([0, 2])
    expected_t1 = torch.tensor([math.log(2 / 3), math.log(1 / 6)])
    expected_t2 = torch.tensor([math.log(1 / 2), math.log(1 / 4)])
    torch.testing.assert_close(token_logprobs(logits, tokens), expected_t1, atol=1e-6, rtol=0)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=2.0), expected_t2, atol=1e-6, rtol=0)


def test_entropy_from_logits():
    vocab = 7
    uniform = torch.stack([torch.zeros(vocab), torch.full((vocab,), 3.5)])  # any constant row is uniform
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2,), math.log(vocab)), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        entropy_from_logits(uniform, temperature=0.3), torch.full((2,), math.log(vocab)), atol=1e-6, rtol=0
    )
    # [1/2, 1/4, 1/4]: 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2
    quarter = torch.tensor([math.log(2), 0.0, 0.0])
    assert math.isclose(float(entropy_from_logits(quarter)), 1.5 * math.log(2), abs_tol=1e-6)


def test_entropy_of_uniform_and_one_hot():
    assert entropy_from_logits(torch.zeros(4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert entropy_from_logits(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_sample_tokens_follow_the_distribution_and_report_its_logprob():
    # row 0: all mass on token 3; row 1: [1/4, 3/4] on tokens 0 and 1, at temperature 1
    logits = torch.tensor([[-INF, -INF, -INF, 0.0, -INF], [0.0, math.log(3), -INF, -INF, -INF]])
    generator = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(400):
        tokens, logprobs = sample_tokens(logits, generator=generator)
        assert tokens.shape == logprobs.shape == (2,)
        assert tokens[0] == 3 and logprobs[0] == 0.0
        assert tokens[1] in (0, 1)
        expected = math.log(0.75) if tokens[1] == 1 else math.log(0.25)
        assert math.isclose(float(logprobs[1]), expected, abs_tol=1e-6)
        picks.append(int(tokens[1]))
    assert 0.65 < sum(picks) / len(picks) < 0.85  # 3/4, binomial sd ~0.02


def test_sample_tokens_one_hot_at_any_temperature():
    logits = torch.tensor([[-INF, 2.0, -INF], [-INF, -INF, -5.0]])
    generator = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 3.0):
        for _ in range(20):
            tokens, logprobs = sample_tokens(logits, temperature, generator)
            assert tokens.tolist() == [1, 2] and logprobs.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("vocab", [2, 446, 50257])
def test_sample_tokens_draw_what_multinomial_draws_from_the_same_generator(vocab):
    """The tokens of ``torch.multinomial`` over the softmax (model.generate's sampling) with the same seed, the
    generator left in the same state, and the log-probs of ``token_logprobs``."""
    for seed, (batch, temperature) in enumerate([(1, 1.0), (16, 1.0), (64, 0.7), (5, 1.6)]):
        logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(100 + seed)) * 4
        logits[0, : vocab // 2] = -INF  # a row with impossible tokens
        ours, theirs = (torch.Generator().manual_seed(seed) for _ in range(2))
        for _ in range(3):
            tokens, logprobs = sample_tokens(logits, temperature, ours)
            expected = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=theirs)[:, 0]
            assert torch.equal(tokens, expected)
            assert torch.equal(logprobs, token_logprobs(logits, tokens, temperature))
        assert torch.equal(ours.get_state(), theirs.get_state())
    # the default generator, as model.generate draws
    torch.manual_seed(7)
    tokens, _ = sample_tokens(logits)
    torch.manual_seed(7)
    assert torch.equal(tokens, torch.multinomial(torch.softmax(logits, -1), 1)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponential_draws_are_the_numbers_of_exponential_(dtype):
    like = torch.empty(64, 50257, dtype=dtype)
    ours, theirs = (torch.Generator().manual_seed(3) for _ in range(2))
    for _ in range(2):
        draws = exponential_draws(like, ours)
        assert draws.dtype == dtype and torch.equal(draws, torch.empty_like(like).exponential_(generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_sample_tokens_refuse_logits_that_give_no_distribution(bad):
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 1.0]])
    with pytest.raises(RuntimeError, match="NaN or \\+inf"):
        sample_tokens(logits)


def test_sample_draws_what_generate_draws_on_the_default_task():
    """``sample`` (prefill, then ``sample_tokens`` and ``advance``) against ``model.generate``'s pure sampling."""
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]  # of equal lengths: no padding
    eos = model.config.eos_token_id
    torch.manual_seed(0)
    ours = sample(model, prompts, eos_token_id=eos, pad_token_id=0, max_new_tokens=14)
    torch.manual_seed(0)
    ids = long(prompts)
    generated = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, max_new_tokens=14, pad_token_id=0
    )
    responses = [row[: row.index(eos) + 1] if eos in row else row for row in generated[:, 4:].tolist()]
    assert ours.response_ids == responses
    assert 1 <= sum(ours.ended_with_eos) < len(prompts)  # both ways of ending are compared


# --------------------------------------------------------------------------- the cached stepper
PAD = 0


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64, bos_token_id=49, eos_token_id=49)
    return GPT2LMHeadModel(config).eval()


def uncached_last_logits(model, tokens: list[int]) -> torch.Tensor:
    """Next-token logits after ``tokens``: one row, no padding, no cache."""
    with torch.no_grad():
        return model(input_ids=long([tokens])).logits[0, -1]


def assert_rows_match(model, stepper, contexts, rows):
    for row in rows:
        torch.testing.assert_close(stepper.last[row], uncached_last_logits(model, contexts[row]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_stepper_matches_uncached_forwards(tiny_lm):
    contexts = [[5, 6, 7, 8, 9], [10, 11]]  # prompts of different lengths, left-padded together
    stepper = CachedStepper(tiny_lm, PAD)
    stepper.prefill(*pad_batch(contexts, PAD, side="left"))
    assert stepper.last.shape == (2, 50)
    assert_rows_match(tiny_lm, stepper, contexts, [0, 1])

    steps = [[1, 2], [3, 4], [5, 6], [7, 8]]
    for step, tokens in enumerate(steps):
        live = torch.tensor([True, step != 2])  # row 1 waits at step 2
        before = stepper.last.clone()
        stepper.advance(long(tokens), live)
        for row in range(2):
            if live[row]:
                contexts[row].append(tokens[row])
                assert_rows_match(tiny_lm, stepper, contexts, [row])
            else:
                torch.testing.assert_close(stepper.last[row], before[row], atol=0, rtol=0)  # kept its last
    assert contexts == [[5, 6, 7, 8, 9, 1, 3, 5, 7], [10, 11, 2, 4, 8]]

    # a new prompt in row 0 while row 1 goes on
    contexts[0] = [20, 21, 22]
    stepper.start_rows(long([0]), *pad_batch([contexts[0]], PAD, side="left"), lambda: contexts)
    assert_rows_match(tiny_lm, stepper, contexts, [0, 1])
    stepper.advance(long([30, 31]))
    contexts[0].append(30), contexts[1].append(31)
    assert_rows_match(tiny_lm, stepper, contexts, [0, 1])

    # a new prompt in row 1 longer than the whole cache: the cache widens on the left
    contexts[1] = list(range(12, 26))
    stepper.start_rows(long([1]), *pad_batch([contexts[1]], PAD, side="left"), lambda: contexts)
    assert_rows_match(tiny_lm, stepper, contexts, [0, 1])
    stepper.advance(long([40, 41]))
    contexts[0].append(40), contexts[1].append(41)
    assert_rows_match(tiny_lm, stepper, contexts, [0, 1])
    assert stepper.mask.sum(-1).tolist() == [len(contexts[0]), len(contexts[1])]


# --------------------------------------------------------------------------- reward-model scores
def test_score_is_read_at_the_last_real_token_for_either_padding_side():
    model = tiny_gpt2_reward_model()
    sequences = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    alone = torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    left = sequence_scores(model, *pad_batch(sequences, 0, side="left"))
    right = sequence_scores(model, *pad_batch(sequences, 0, side="right"))
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    # and the score changes when the last real token does (it is really read there)
    changed = sequence_scores(model, *pad_batch([[5, 6, 8]], 0))
    assert not torch.allclose(changed, alone[:1])


def test_reward_model_with_several_outputs_is_rejected():
    with pytest.raises(ValueError, match=r"one scalar per sequence.*num_labels=1"):
        sequence_scores(tiny_gpt2_reward_model(num_labels=2), *pad_batch([[1, 2]], 0))


# --------------------------------------------------------------------------- KV caches
def test_a_model_without_a_dynamic_cache_is_refused_naming_the_cache_class(tokenizer, make_env):
    from transformers import AutoModelForCausalLM

    class TupleCacheLM(type(AutoModelForCausalLM.from_pretrained(POLICY_DIR))):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            key = "cache" if "cache" in out else "past_key_values"  # its name since transformers 5.24, and before
            out[key] = tuple(out[key].layers)  # a legacy tuple, not a DynamicCache
            return out

    model = TupleCacheLM.from_pretrained(POLICY_DIR)
    with pytest.raises(TypeError, match=r"reference model \(TupleCacheLM\) returns a tuple KV cache.*DynamicCache"):
        make_env(reference_model=model, tokenizer=tokenizer)
