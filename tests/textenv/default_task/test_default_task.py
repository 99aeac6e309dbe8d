"""The shipped default task: it loads with plain from_pretrained, meets its quality bars, and rebuilds."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from textenv.default_task import ARTIFACTS_DIR, POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.default_task.__main__ import main
from textenv.default_task.build import BuildConfig, build

TINY = dict(
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


def test_shipped_models_load_with_auto_classes():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    assert policy.config.vocab_size == reward_model.config.vocab_size == len(tokenizer)
    assert reward_model.config.num_labels == 1
    assert policy.config.pad_token_id == tokenizer.pad_token_id != policy.config.eos_token_id == tokenizer.eos_token_id
    dropouts = [
        getattr(m.config, k) for m in (policy, reward_model) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")
    ]
    assert dropouts == [0.0] * 6


def test_prompts_are_disjoint_splits_of_review_openings():
    train, held_out = load_prompts("train"), load_prompts("eval")
    assert len(train) > 100 and len(held_out) > 20
    assert not set(train) & set(held_out)
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        load_prompts("test")


def test_shipped_task_meets_its_quality_bars(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["report", "--n-samples", "256", "--json-out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"{report['reward_model/pairwise_accuracy']:.4f}" in printed
    assert report["reward_model/pairwise_accuracy"] >= 0.95
    assert report["policy/eos_rate"] >= 0.90
    assert report["policy/well_formed_rate"] >= 0.80
    assert 0.25 <= report["score/frac_positive"] <= 0.75  # room for RL to improve


def test_reduced_rebuild_from_the_command_line_is_deterministic(tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    main(["build", "--out", str(tmp_path / "cli"), *flags])
    saved = json.loads((tmp_path / "cli" / "task.json").read_text())
    assert saved["config"] == {**saved["config"], **TINY}
    # the reward model learned something even in 60 steps (chance is 0.5)
    assert saved["report"]["reward_model/pairwise_accuracy"] > 0.6

    build(BuildConfig(**TINY), tmp_path / "again", progress=False)
    for name, auto in (("policy", AutoModelForCausalLM), ("reward_model", AutoModelForSequenceClassification)):
        first = auto.from_pretrained(tmp_path / "cli" / name).state_dict()
        second = auto.from_pretrained(tmp_path / "again" / name).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), f"{name} differs between two builds"
    assert (tmp_path / "cli" / "prompts_eval.txt").read_text() == (tmp_path / "again" / "prompts_eval.txt").read_text()
    assert load_prompts("eval", tmp_path / "cli") == load_prompts("eval", ARTIFACTS_DIR)  # same seed, same split
