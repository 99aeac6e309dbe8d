"""The shipped default task: it loads with plain from_pretrained and meets its quality bars (built: test_build.py)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.default_task.__main__ import main


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
