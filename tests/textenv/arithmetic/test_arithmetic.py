"""The shipped arithmetic task: its problems, tokenizer, reward, policy quality."""

import json
import random
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textenv.arithmetic import ARTIFACTS_DIR, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, POLICY_DIR, exact_match, load_rows
from textenv.arithmetic.__main__ import main
from textenv.arithmetic.data import BuildConfig, encode_sft, problem, sft_corpus, splits
from textenv.arithmetic.report import accuracy_report, generate
from textenv.arithmetic.tokenizer import build_tokenizer
from textenv.lm import sample


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def policy():
    return AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()


def operands(row: dict) -> tuple[int, int]:
    a, b = row["prompt"].removesuffix("=").split("+")
    return int(a), int(b)


# ---------------------------------------------------------------- problems


def test_shipped_rows_are_the_seeded_splits_and_disjoint():
    train, held_out = load_rows("train"), load_rows("eval")
    train_pairs, eval_pairs, sft_pairs = splits(BuildConfig())
    assert train == [problem(a, b) for a, b in train_pairs] and len(train) == 2000
    assert held_out == [problem(a, b) for a, b in eval_pairs] and len(held_out) == 200
    assert splits(BuildConfig()) == (train_pairs, eval_pairs, sft_pairs)  # deterministic
    assert splits(BuildConfig(seed=1))[1] != eval_pairs
    assert not set(train_pairs) & set(eval_pairs)
    assert not set(sft_pairs) & (set(train_pairs) | set(eval_pairs))  # eval is held out from SFT too
    assert len(train_pairs) + len(eval_pairs) + len(sft_pairs) == 100 * 100


def test_answers_are_the_sums():
    for row in load_rows("train") + load_rows("eval"):
        assert set(row) == {"prompt", "answer"}
        a, b = operands(row)
        assert 0 <= a <= 99 and 0 <= b <= 99 and row["prompt"] == f"{a}+{b}="
        assert int(row["answer"]) == a + b and row["answer"] == str(a + b)


def test_load_rows_rejects_an_unknown_split():
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        load_rows("test")


def test_sft_corpus_is_deterministic_and_corrupts_the_configured_share():
    config = BuildConfig()
    pairs = splits(config)[2]
    corpus = sft_corpus(pairs, config)
    assert corpus == sft_corpus(pairs, config) and len(corpus) == len(pairs) * config.sft_copies
    sums = {f"{a}+{b}=": a + b for a, b in pairs}
    offsets = Counter(int(answer) - sums[prompt] for prompt, answer in corpus)
    assert set(offsets) <= {-10, -1, 0, 1, 10}
    assert abs(1 - offsets[0] / len(corpus) - config.corrupt_prob) < 0.02
    assert all(int(answer) >= 0 for _, answer in corpus)


def test_sft_labels_cover_answer_and_eos_only():
    tokenizer = build_tokenizer()
    ids, mask, labels = encode_sft(tokenizer, [("7+5=", "12"), ("99+99=", "198")])
    eos = [tokenizer.eos_token_id]
    assert labels[0].tolist() == [-100] * 4 + tokenizer("12")["input_ids"] + eos + [-100] * 3
    assert labels[1].tolist() == [-100] * 6 + tokenizer("198")["input_ids"] + eos
    assert ids[0].tolist() == tokenizer("7+5=12")["input_ids"] + eos + [tokenizer.pad_token_id] * 3
    assert mask.tolist() == [[1] * 7 + [0] * 3, [1] * 10]


# ---------------------------------------------------------------- tokenizer


def test_a_character_tokenizer_keeps_runs_of_newlines_and_tabs_as_characters():
    tokenizer = build_tokenizer("ab \n\t")
    text = "a\n\nb\t\t a\n"  # "." does not match a newline: "\n\n" once became one unknown token
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list(text)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("which", ["shipped", "built"])
def test_tokenizer_is_one_token_per_character(which, tokenizer):
    tok = tokenizer if which == "shipped" else build_tokenizer()
    assert tok.pad_token == "<pad>" and tok.unk_token == "<unk>" and tok.eos_token == "<eos>"
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("17+25=", split_special_tokens=True)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("17+25=")  # no BOS or EOS added
    assert tok.decode(tok("42")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "42"
    for row in load_rows("eval"):
        for text in (row["prompt"], row["answer"], row["prompt"] + row["answer"]):
            ids = tok(text)["input_ids"]
            assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("4 x")["input_ids"] == [tok("4")["input_ids"][0], tok.unk_token_id, tok.unk_token_id]


def test_suggested_token_budgets_fit_every_problem(tokenizer):
    rows = load_rows("train") + load_rows("eval")
    assert max(len(tokenizer(r["prompt"])["input_ids"]) for r in rows) <= MAX_PROMPT_TOKENS
    assert max(len(tokenizer(r["answer"])["input_ids"]) + 1 for r in rows) <= MAX_NEW_TOKENS


# ---------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("response", "reward"),
    [("42", 1.0), (" 42 ", 1.0), ("43", 0.0), ("24", 0.0), ("42+1", 0.0), ("4242", 0.0), ("420", 0.0), ("", 0.0)],
)
def test_exact_match(response, reward):
    row = {"prompt": "17+25=", "answer": "42"}
    assert exact_match(prompt="17+25=", response=response, response_ids=[7, 5, 2], row=row) == reward


# ---------------------------------------------------------------- the shipped policy


def test_shipped_policy_loads_with_auto_classes(policy, tokenizer):
    assert policy.config.vocab_size == len(tokenizer) == 15
    assert policy.config.pad_token_id == tokenizer.pad_token_id != policy.config.eos_token_id == tokenizer.eos_token_id
    assert policy.config.n_positions >= 48
    assert [getattr(policy.config, k) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")] == [0.0] * 3
    assert sum(f.stat().st_size for f in ARTIFACTS_DIR.rglob("*") if f.is_file()) < 1.5e6


def test_shipped_policy_is_right_often_but_not_always(policy, tokenizer):
    report = accuracy_report(policy, tokenizer, load_rows("eval")[:64], n_samples=64, seed=0)
    assert 0.05 < report["accuracy/sampled"] < 0.9  # room for RL
    assert report["accuracy/greedy"] >= 0.8  # its most likely answer is mostly right
    assert report["policy/eos_rate"] >= 0.9 and report["policy/shape_rate"] >= 0.9


def test_report_generation_draws_what_the_cached_sampler_draws(policy, tokenizer):
    """The report's uncached loop and ``textenv.lm.sample`` (KV cache) agree draw for draw on the same generator."""
    rows = random.Random(0).sample(load_rows("eval"), 32)
    prompt_ids = tokenizer([r["prompt"] for r in rows])["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses, ended = generate(policy, prompt_ids, eos, pad, 8, 1.0, torch.Generator().manual_seed(3))
    cached = sample(policy, prompt_ids, eos, pad, 8, 1.0, torch.Generator().manual_seed(3))
    assert responses == cached.response_ids and ended == cached.ended_with_eos
    greedy, _ = generate(policy, prompt_ids, eos, pad, 8, None)
    assert all(r[-1] == eos and eos not in r[:-1] for r in greedy)


def test_report_command_prints_its_figures(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["report", "--samples", "64", "--json-out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"accuracy/sampled   {report['accuracy/sampled']:.4f}" in printed
    assert report["policy/n_samples"] == 64 and report["policy/n_prompts"] == 200
