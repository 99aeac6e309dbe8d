"""The learning-rate schedule of a run and of a resumed one: a function of the iteration and the settings in force."""

import json

import pytest
import torch
from safetensors.torch import load_file

import agents.train
from agents.train import TrainConfig, TrainingStopped, learning_rate, train


def tiny_config(run_dir, iterations: int) -> TrainConfig:
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = iterations, 8, 10, 8
    config.run.run_dir, config.run.progress, config.run.threads = run_dir, False, 1
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.ppo.epochs = 1
    config.env.max_new_tokens = 4
    return config


def logged_rates(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iteration"]: row["perf/lr"] for row in rows if "perf/lr" in row}


def test_the_rate_decays_linearly_to_zero_at_the_last_iteration():
    config = tiny_config("unused", iterations=4)
    rate = config.ppo.learning_rate
    assert [learning_rate(config, i) for i in range(5)] == [rate, rate * 0.75, rate * 0.5, rate * 0.25, 0.0]
    config.run.iterations = 8  # what a resumed run with --iterations 8 does from its next iteration on
    assert learning_rate(config, 4) == rate * 0.5


def test_a_resumed_run_with_more_iterations_follows_the_new_schedule(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, iterations=2))
    longer = tiny_config(run_dir, iterations=4)
    longer.run.resume = True
    train(longer)
    rate = longer.ppo.learning_rate
    # iterations 0-1 ran under --iterations 2, the resumed 2-3 under --iterations 4 (the first resumed one
    # included: it does not keep the rate the checkpoint's optimizer held, 0 at the end of the first schedule)
    assert logged_rates(run_dir) == {0: rate, 1: rate * 0.5, 2: rate * 0.5, 3: rate * 0.25}


def test_a_resumed_run_with_the_same_iterations_ends_with_the_same_weights(tmp_path, monkeypatch):
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_config(straight_dir, iterations=3))

    def stop_after_the_first_iteration(self, dist):  # as Ctrl-C during iteration 0 does
        return True

    with monkeypatch.context() as patch:
        patch.setattr(agents.train.StopSignals, "requested", stop_after_the_first_iteration)
        patch.setattr(agents.train.StopSignals, "signal_name", property(lambda self: "SIGTERM"))
        with pytest.raises(TrainingStopped):
            train(tiny_config(stopped_dir, iterations=3))
    assert sorted(logged_rates(stopped_dir)) == [0]
    resumed = tiny_config(stopped_dir, iterations=3)
    resumed.run.resume = True
    train(resumed)
    assert logged_rates(stopped_dir) == logged_rates(straight_dir)
    straight = load_file(straight_dir / "final" / "model.safetensors")
    final = load_file(stopped_dir / "final" / "model.safetensors")
    assert straight.keys() == final.keys()
    assert all(torch.equal(final[key], straight[key]) for key in straight), "the resumed run diverged"
