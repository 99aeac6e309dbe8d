"""agents/build: each embedded task builds from nothing, deterministically, on a tiny config, from the command line
and from Python."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from agents.build import arithmetic, calculator, reviews
from agents.build.__main__ import main
from textenv.arithmetic import load_rows
from textenv.calculator import CALL, SEPARATOR
from textenv.default_task import ARTIFACTS_DIR, load_prompts

TINY_REVIEWS = dict(
    n_reviews=300,
    n_pairs=400,
    sft_steps=60,
    reward_steps=60,
    policy_n_embd=32,
    reward_n_embd=32,
    policy_n_layer=1,
    reward_n_layer=1,
    n_positions=64,
    sft_batch_size=32,
    reward_batch_size=32,
)
TINY_ARITHMETIC = dict(
    n_eval=50, n_train=100, sft_copies=1, n_embd=32, n_layer=1, n_head=2, sft_steps=20, sft_batch_size=32
)
TINY_CALCULATOR = dict(sft_copies=1, n_embd=32, n_layer=1, n_head=2, n_positions=32, sft_steps=20, sft_batch_size=32)


def same_weights(first_dir, second_dir, auto=AutoModelForCausalLM) -> bool:
    first, second = auto.from_pretrained(first_dir).state_dict(), auto.from_pretrained(second_dir).state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_reduced_review_build_from_the_command_line_is_deterministic(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_REVIEWS.items()]
    main(["reviews", "--out", str(tmp_path / "cli"), *flags])
    saved = json.loads((tmp_path / "cli" / "task.json").read_text())
    assert saved["config"] == {**saved["config"], **TINY_REVIEWS}
    # the reward model learned something even in 60 steps (chance is 0.5)
    assert saved["report"]["reward_model/pairwise_accuracy"] > 0.6

    reviews.build(reviews.BuildConfig(**TINY_REVIEWS), tmp_path / "again", progress=False)
    assert same_weights(tmp_path / "cli" / "policy", tmp_path / "again" / "policy")
    assert same_weights(
        tmp_path / "cli" / "reward_model", tmp_path / "again" / "reward_model", AutoModelForSequenceClassification
    )
    assert (tmp_path / "cli" / "prompts_eval.txt").read_text() == (tmp_path / "again" / "prompts_eval.txt").read_text()
    assert load_prompts("eval", tmp_path / "cli") == load_prompts("eval", ARTIFACTS_DIR)  # same seed, same split


def test_tiny_arithmetic_build_writes_a_loadable_task_deterministically(tmp_path):
    config = arithmetic.BuildConfig(**TINY_ARITHMETIC)
    report = arithmetic.build(config, tmp_path / "first", progress=False, n_report_samples=16)
    arithmetic.build(config, tmp_path / "again", progress=False, n_report_samples=16)
    saved = json.loads((tmp_path / "first" / "task.json").read_text())
    assert saved["config"] == {**saved["config"], **TINY_ARITHMETIC} and saved["report"] == report
    assert len(load_rows("train", tmp_path / "first")) == 100 and len(load_rows("eval", tmp_path / "first")) == 50
    assert same_weights(tmp_path / "first" / "policy", tmp_path / "again" / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "first" / "policy")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "first" / "policy")
    assert policy.config.vocab_size == len(tokenizer) and policy.config.n_embd == 32


def test_tiny_calculator_build_writes_a_loadable_task_deterministically(tmp_path):
    config = calculator.BuildConfig(**TINY_CALCULATOR)
    report = calculator.build(config, tmp_path / "first", progress=False, n_report_samples=16)
    calculator.build(config, tmp_path / "again", progress=False, n_report_samples=16)
    saved = json.loads((tmp_path / "first" / "task.json").read_text())
    assert saved["config"] == {**saved["config"], **TINY_CALCULATOR} and saved["report"] == report
    assert same_weights(tmp_path / "first" / "policy", tmp_path / "again" / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "first" / "policy")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "first" / "policy")
    assert policy.config.vocab_size == len(tokenizer) == 17 and policy.config.n_embd == 32
    assert tokenizer.convert_tokens_to_ids([CALL, SEPARATOR]) == [15, 16]
