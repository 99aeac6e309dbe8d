"""The trainer under faults and bad input: NaN updates, changed settings on --resume, foreign run directories.

The command line is called in-process (``agents.__main__.main(argv)``): its refusals are ``SystemExit(2)`` with a
one-line message on stderr; a traceback would escape as the exception itself.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import agents.ppo
from agents.__main__ import main
from agents.train import TrainConfig, train


def tiny_config(run_dir, iterations: int = 3) -> TrainConfig:
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = iterations, 8, 10, 8
    config.run.run_dir, config.run.progress = run_dir, False
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.ppo.epochs = 2
    config.env.max_new_tokens = 6
    return config


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poison_updates(monkeypatch, iterations: set[int], steps_per_iteration: int):
    """Make every training forward of the given iterations' updates return NaN log-probs."""
    real = agents.ppo.score_rollout
    calls = {"n": 0}
    per_update = steps_per_iteration + 1  # the no-grad re-score, then one forward per step

    def score_rollout(*args, **kwargs):
        scored = real(*args, **kwargs)
        calls["n"] += 1
        iteration, position = divmod(calls["n"] - 1, per_update)
        if iteration in iterations and position > 0 and torch.is_grad_enabled():
            scored.logprobs = scored.logprobs * float("nan")
        return scored

    monkeypatch.setattr(agents.ppo, "score_rollout", score_rollout)


def test_a_nan_update_is_skipped_counted_and_never_checkpointed(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", iterations=3)
    poison_updates(monkeypatch, {1}, steps_per_iteration=2)
    train(config)
    logged = {r["iteration"]: r for r in rows(tmp_path / "run") if "ppo/skipped_steps" in r}
    assert [logged[i]["ppo/skipped_steps"] for i in range(3)] == [0, 2, 0]
    assert all(logged[i]["ppo/steps"] == 2 for i in range(3))
    weights = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nan_updates_in_a_row_stop_the_run_and_keep_the_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "run", iterations=6)
    config.run.max_skipped_updates = 2
    poison_updates(monkeypatch, {2, 3, 4, 5}, steps_per_iteration=2)
    with pytest.raises(FloatingPointError, match=r"2 updates in a row had NaN or inf gradients.*checkpoint-000002"):
        train(config)
    latest = tmp_path / "run" / (tmp_path / "run" / "latest").read_text()
    weights = load_file(latest / "agent" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_changed_settings_and_allows_the_run_length(tmp_path):
    config = tiny_config(tmp_path / "run", iterations=2)
    train(config)

    changed = tiny_config(tmp_path / "run", iterations=3)
    changed.run.resume, changed.run.batch_size, changed.env.kl_coef = True, 16, 0.2
    with pytest.raises(ValueError, match=r"settings differ.*kl_coef: 0\.05 -> 0\.2; .*batch_size: 8 -> 16"):
        train(changed)

    longer = tiny_config(tmp_path / "run", iterations=3)
    longer.run.resume = True
    train(longer)
    assert [r["iteration"] for r in rows(tmp_path / "run") if "env/score" in r] == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["iterations"] == 3


def test_the_resume_command_takes_the_saved_settings(tmp_path, capsys):
    train(tiny_config(tmp_path / "run", iterations=2))
    base = ["--run-dir", str(tmp_path / "run"), "--resume", "--no-progress"]
    with pytest.raises(SystemExit) as refused:
        main([*base, "--max-new-tokens", "9"])
    assert refused.value.code == 2
    assert "max_new_tokens: 6 -> 9" in capsys.readouterr().err
    main([*base, "--iterations", "3"])
    assert "final policy:" in capsys.readouterr().out
    assert [r["iteration"] for r in rows(tmp_path / "run") if "env/score" in r] == [0, 1, 2]


def test_a_non_empty_directory_of_another_tool_is_refused(tmp_path):
    run_dir = tmp_path / "elsewhere"
    (run_dir / "checkpoint-500").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # a model's config is not a run
    with pytest.raises(FileExistsError, match=r"not empty and holds no textenv run.*--allow-existing-run-dir"):
        train(tiny_config(run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-500", "config.json"]

    config = tiny_config(run_dir, iterations=1)
    config.run.allow_existing_run_dir = True
    train(config)
    assert (run_dir / "checkpoint-500").is_dir() and (run_dir / "final").is_dir()


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    config = tiny_config(tmp_path / "run")
    config.env.reward_model = str(tmp_path / "missing_reward_model")
    with pytest.raises(FileNotFoundError, match="reward model path .*missing_reward_model.* does not exist"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--eval-episodes", "0"], "eval_episodes must be >= 1, got 0"),
        (["--kl-coef", "nan"], "kl_coef must be >= 0 .* and finite, got nan"),
        (["--learning-rate", "inf"], "learning_rate must be > 0 and finite, got inf"),
        (["--policy", "/no/such/policy"], "--policy '/no/such/policy' is not a directory"),
    ],
)
def test_bad_command_line_values_name_the_flag_and_make_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        main(["--run-dir", str(tmp_path / "run"), *flags])
    assert refused.value.code == 2
    stderr = capsys.readouterr().err
    flat = " ".join(stderr.replace("│", " ").split())
    assert re.search(message, flat), stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "holds no prompts"), (b"  \n\t\n", "holds no prompts"), (b"\xff\xfe good", "is not UTF-8 text")],
)
def test_bad_prompt_files_are_named(tmp_path, capsys, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    for flag, value, error in [
        ("--prompts", path, message),
        ("--eval-prompts", path, message),
        ("--prompts", tmp_path, "is a directory"),
    ]:
        with pytest.raises(SystemExit) as refused:
            main(["--run-dir", str(tmp_path / "run"), flag, str(value)])
        stderr = capsys.readouterr().err
        assert refused.value.code == 2 and f"{flag} file '{value}' {error}" in stderr, stderr
    assert not (tmp_path / "run").exists()
