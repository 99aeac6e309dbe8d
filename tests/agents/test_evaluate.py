"""Evaluation: pass@k and the summary by hand, every eval prompt answered k times, the command's JSON."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from agents.evaluate import EvalConfig, evaluate_policy, main, pass_at_k, run_evaluation, summarize
from agents.policy import ActorCritic
from agents.rollout import make_rollout_env
from agents.train import TrainConfig, Trainer, eval_seed
from textenv import TokenEnvConfig
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR


def test_pass_at_k_by_hand():
    # three prompts, k = 2: right answers (0, 1), (0, 0), (1, 1) -> 2 of 3 prompts have one
    assert pass_at_k(torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0]), 2) == pytest.approx(2 / 3)
    assert pass_at_k(torch.tensor([0.0, 1.0, 0.0]), 1) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="groups of k=2"):
        pass_at_k(torch.tensor([1.0, 0.0, 1.0]), 2)


def test_summary_by_hand():
    data = {
        "score": torch.tensor([1.0, 0.0, 0.0, 1.0]),
        "kl": torch.tensor([0.5, 1.5, -0.5, 2.5]),
        "length": torch.tensor([2, 4, 4, 6]),
        "terminated": torch.tensor([True, True, False, True]),
        "reward/exact_match": torch.tensor([1.0, 0.0, 0.0, 1.0]),
    }
    metrics = summarize(data, "eval", k=2, accuracy="exact_match")
    assert metrics["eval/score"] == 0.5
    assert metrics["eval/kl"] == pytest.approx(1.0)  # (0.5 + 1.5 - 0.5 + 2.5) / 4
    assert metrics["eval/response_length"] == 4.0
    assert metrics["eval/eos_rate"] == 0.75
    assert metrics["eval/reward/exact_match"] == 0.5
    assert metrics["eval/accuracy"] == 0.5
    assert metrics["eval/pass@2"] == 1.0  # prompt 1 answered (right, wrong), prompt 2 (wrong, right)
    assert metrics["eval/score_q00"] == 0.0 and metrics["eval/score_q100"] == 1.0
    assert metrics["eval/score_q50"] == 0.5
    assert metrics["eval/episodes"] == 4.0


def test_every_prompt_is_answered_k_times_across_batches():
    seen = []

    def record(prompt, **kwargs):
        seen.append(prompt)
        return 0.0

    prompts = ["The movie was", "I thought", "This film", "The plot", "A story"]
    env = make_rollout_env(4, TokenEnvConfig(reward_fns=[record], prompts=prompts, max_new_tokens=3, device="cpu"))
    agent = ActorCritic.from_models(POLICY_DIR)
    generator = torch.Generator().manual_seed(0)
    data = evaluate_policy(agent, env, np.arange(5), 2, 1.0, generator)
    assert len(data["score"]) == 10  # 5 prompts x 2, the repeats that filled the last batch dropped
    # three batches of 4 ran (12 episodes); every prompt's 2 answers are among them
    assert sorted(seen[:10]) == sorted(p for p in prompts for _ in range(2))
    with pytest.raises(ValueError, match="multiple of k=3"):
        evaluate_policy(agent, env, np.arange(2), 3, 1.0, generator)


def test_evaluation_command_writes_json_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--num-prompts", "6", "--k", "2", "--batch-size", "4", "--max-new-tokens", "8", "--json", str(out)]
    main([*argv, "--device", "cpu"])
    record = json.loads(out.read_text())
    assert record["task"] == "reviews" and record["k"] == 2 and record["prompts"] == 6 and record["episodes"] == 12
    assert "accuracy" not in record  # the review task has no exact answers
    for key in ("score", "score_std", "kl", "response_length", "eos_rate", "reward/reward_model", "score_q50"):
        assert np.isfinite(record[key]), key
    assert record["reward/reward_model"] == pytest.approx(record["score"])  # the reward model alone pays
    printed = capsys.readouterr().out
    assert "| score |" in printed and "| pass@" not in printed


def test_evaluation_is_reproducible_for_a_seed():
    config = EvalConfig(env=TokenEnvConfig(split="eval", max_new_tokens=6), num_prompts=4, k=2, batch_size=8)
    first, second = run_evaluation(config, progress=False), run_evaluation(config, progress=False)
    assert first == second


def test_a_policy_path_that_is_not_a_directory_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--policy", str(tmp_path / "missing"), "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--policy" in capsys.readouterr().err


def test_the_command_and_the_trainers_evaluation_report_the_same_figures(tmp_path):
    """One definition of ``eval/score``: both run the env on the same resolved settings (score_clip included), so
    the command with k=1 and the trainer's seed samples the trainer's episodes and reports its figures. The reward
    model here scores far beyond the clip at 5, where two definitions would part."""
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR)
    with torch.no_grad():
        reward_model.score.weight.mul_(20.0)
    reward_model.save_pretrained(tmp_path / "loud_reward_model")
    settings = dict(reward_model=str(tmp_path / "loud_reward_model"), max_new_tokens=6)

    config = TrainConfig(env=TokenEnvConfig(**settings))
    config.run.run_dir, config.run.progress, config.run.device = tmp_path / "run", False, "cpu"
    config.run.eval_episodes, config.run.threads = 8, torch.get_num_threads()
    trainer = Trainer(config)
    trained = trainer.evaluate(0)
    trainer.logger.close()

    command = EvalConfig(
        env=TokenEnvConfig(split="eval", **settings), k=1, num_prompts=8, batch_size=8, seed=eval_seed(0, 0)
    )
    evaluated = run_evaluation(replace(command, device="cpu"), progress=False)
    assert max(abs(trained["eval/score_q00"]), abs(trained["eval/score_q100"])) > 5  # beyond the clip
    assert trained.keys() <= evaluated.keys()
    for key, value in trained.items():
        assert evaluated[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
