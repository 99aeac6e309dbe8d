"""Training with reward functions: per-function metrics, the command line's --reward-fn, the KL as a loss term."""

import json
import sys

import pytest

from agents.__main__ import main
from agents.ppo import PPOConfig
from agents.train import RunConfig, TrainConfig, train
from textenv import TokenEnvConfig

SMALL = dict(iterations=2, batch_size=8, eval_every=1, eval_episodes=8, progress=False)


def short_response(prompt, response, response_ids, row):
    return 1.0 if len(response_ids) <= 4 else 0.0


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_paying_term_is_a_training_and_eval_metric(tmp_path):
    from textenv.default_task import REWARD_MODEL_DIR

    config = TrainConfig(
        env=TokenEnvConfig(
            reward_model=str(REWARD_MODEL_DIR), reward_fns={"short": short_response}, max_new_tokens=6, score_clip=5.0
        ),
        ppo=PPOConfig(minibatch_size=8, micro_batch_size=8),
        run=RunConfig(run_dir=tmp_path / "run", **SMALL),
    )
    train(config)
    logged = rows(tmp_path / "run")
    for row in [r for r in logged if "env/score" in r]:
        # the score is the reward model's plus the function's (weight 1)
        assert row["env/score"] == pytest.approx(row["env/reward/reward_model"] + row["env/reward/short"], abs=1e-5)
        assert 0.0 <= row["env/reward/short"] <= 1.0
    assert all("eval/reward/short" in r for r in logged if "eval/score" in r)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["env"]["reward_fns"] == {"short": f"{__name__}:short_response"}  # stable across runs


def test_reward_fn_flag_on_the_command_line_needs_no_reward_model(tmp_path, monkeypatch, capsys):
    module = tmp_path / "my_rewards.py"
    module.write_text("def brevity(response_ids, **kwargs):\n    return 1.0 / len(response_ids)\n")
    # as `python -m agents` run from the module's directory, where it is importable
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    run_dir = tmp_path / "run"
    argv = ["--run-dir", str(run_dir), "--reward-fn", "my_rewards:brevity"]
    argv += ["--iterations", "1", "--batch-size", "8", "--minibatch-size", "8", "--micro-batch-size", "8"]
    argv += ["--eval-episodes", "8", "--max-new-tokens", "6", "--no-progress"]
    main(argv)
    logged = rows(run_dir)
    assert "env/reward/reward_model" not in logged[0]  # no reward model was loaded
    assert logged[0]["env/score"] == pytest.approx(logged[0]["env/reward/brevity"])

    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main([*argv[:2], "--reward-fn", "my_rewards:nope"])
    assert bad.value.code == 2 and "'my_rewards' has no attribute 'nope'" in capsys.readouterr().err


def test_kl_as_a_loss_term_leaves_the_rewards_without_kl(tmp_path):
    config = TrainConfig(
        env=TokenEnvConfig(reward_fns={"short": short_response}, max_new_tokens=6),
        ppo=PPOConfig(algo="grpo", minibatch_size=8, micro_batch_size=8, kl_penalty="loss", kl_estimator="k3"),
        run=RunConfig(run_dir=tmp_path / "run", **SMALL),
    )
    train(config)
    first, second = [r for r in rows(tmp_path / "run") if "env/score" in r]
    # the first rollout's policy is the reference (KL 0, to the 1e-7 by which the agent's fused GELU differs from
    # the reference's); after one update the KL is measured, but paid in the loss
    assert abs(first["env/kl"]) < 1e-6 and abs(second["env/kl"]) > 1e-3
    assert first["env/non_score_reward"] == second["env/non_score_reward"] == 0.0
    assert first["loss/kl"] > 0.0 and second["loss/kl"] > 0.0
