"""The training command end to end: outputs, SIGKILL and --resume, bad configuration."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from agents.train import TrainConfig, train

TINY = [
    "--iterations", "12", "--batch-size", "16", "--minibatch-size", "8", "--micro-batch-size", "8",
    "--eval-every", "4", "--eval-episodes", "16", "--max-new-tokens", "12", "--no-progress",
]  # fmt: skip


def command(run_dir, *extra):
    return [sys.executable, "-m", "agents", "--run-dir", str(run_dir), *TINY, *extra]


def checkpointed_iteration(run_dir) -> int:
    pointer = run_dir / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.exists() else -1


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The final weights of an uninterrupted run of ``command``."""
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(command(run), check=True, capture_output=True)
    return AutoModelForCausalLM.from_pretrained(run / "final").state_dict()


def start_and_wait_for_checkpoint(run, log_path, iteration: int = 3) -> subprocess.Popen:
    log = log_path.open("w")  # a file, not a pipe: a full pipe would stall the run
    process = subprocess.Popen(command(run), stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while checkpointed_iteration(run) < iteration and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be stopped: " + log_path.read_text()[-2000:]
    return process


@pytest.mark.slow
def test_sigkill_then_resume_loses_at_most_one_iteration_and_matches_an_uninterrupted_run(tmp_path, straight):
    run = tmp_path / "killed"
    process = start_and_wait_for_checkpoint(run, tmp_path / "killed.log")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = checkpointed_iteration(run)
    logged = max(row["iteration"] for row in metric_rows(run))
    assert 3 <= saved < 11
    assert logged <= saved + 1  # at most the iteration in flight is lost

    resumed = subprocess.run(command(run, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = metric_rows(run)
    assert [r["iteration"] for r in rows if "env/score" in r] == list(range(12))  # each once, in order
    assert [r["iteration"] for r in rows if "eval/score" in r] == [0, 4, 8, 12]

    resumed = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), "resumed run diverged from a straight run"
    for name in ("metrics.csv", "samples.jsonl", "learning_curve.png", "config.json"):
        assert (run / name).stat().st_size > 0
    assert any((run / "tensorboard").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_checkpoints_the_iteration_and_resume_matches_an_uninterrupted_run(
    tmp_path, straight, signum
):
    run = tmp_path / "stopped"
    process = start_and_wait_for_checkpoint(run, tmp_path / "stopped.log")
    os.kill(process.pid, signum)
    assert process.wait(timeout=120) == 128 + signum
    message = (tmp_path / "stopped.log").read_text().strip().splitlines()[-1]
    stopped_after = int(message.split("after iteration ")[1].split(";")[0])
    assert message.startswith(f"stopped by {signal.Signals(signum).name} after iteration {stopped_after}; checkpoint ")
    assert "--resume" in message and "Traceback" not in (tmp_path / "stopped.log").read_text()
    assert checkpointed_iteration(run) == stopped_after  # the iteration in flight was finished and saved
    assert [r["iteration"] for r in metric_rows(run)] == [*range(stopped_after + 1)]  # nothing logged is lost

    resumed = subprocess.run(command(run, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    rows = metric_rows(run)
    assert [r["iteration"] for r in rows if "env/score" in r] == list(range(12))
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert all(torch.equal(final[k], straight[k]) for k in straight), "resumed run diverged from a straight run"


def test_outputs_of_a_short_run(tmp_path):
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = 2, 8, 1, 8
    config.run.run_dir, config.run.progress = tmp_path / "run", False
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.env.max_new_tokens = 8
    final = train(config)
    rows = metric_rows(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for key in ("env/score", "env/kl", "env/non_score_reward", "policy/entropy", "ppo/approx_kl", "ppo/clipfrac",
                "ppo/value_clipfrac", "ppo/explained_variance", "ppo/ratio_mean", "loss/policy", "loss/value",
                "perf/tokens_per_s", "kl/coef"):  # fmt: skip
        assert key in rows[0], key
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "env/score" in header and "eval/positive_rate" in header
    png = (tmp_path / "run" / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {0, 1} and all(s["response"] is not None for s in samples)
    AutoModelForCausalLM.from_pretrained(final)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)  # a second run into the same directory would mix two runs


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda c: setattr(c.run, "batch_size", 10), ValueError, "multiple of minibatch_size"),
        (lambda c: setattr(c.ppo, "micro_batch_size", 5), ValueError, "multiple of micro_batch_size"),
        (lambda c: setattr(c.env, "prompts", "no/such/file.txt"), FileNotFoundError, "does not exist"),
        (lambda c: setattr(c.run, "resume", True), FileNotFoundError, "no checkpoint"),
    ],
)
def test_bad_configuration_is_rejected_before_any_work(tmp_path, change, error, message):
    config = TrainConfig()
    config.run.run_dir = tmp_path / "run"
    change(config)
    with pytest.raises(error, match=message):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_line_cut_off_by_a_kill_is_dropped_on_resume(tmp_path):
    from agents.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0, "env/score": 1.0}\n{"iteration": 1, "env/sc')
    logger = RunLogger(tmp_path, start_iteration=1)
    assert logger.rows == [{"iteration": 0, "env/score": 1.0}]
    logger.close()


def test_a_run_with_its_own_tokenizer_directory_and_jsonl_prompts(tmp_path):
    import shutil

    from textenv.default_task import POLICY_DIR, load_prompts

    policy, tokenizer = tmp_path / "policy", tmp_path / "tokenizer"
    policy.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (POLICY_DIR / name).exists():
            shutil.copy(POLICY_DIR / name, policy / name)
    shutil.copytree(POLICY_DIR, tokenizer, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(load_prompts("train")[:8]))
    )
    config = TrainConfig()
    config.run.iterations, config.run.batch_size, config.run.eval_every, config.run.eval_episodes = 1, 8, 1, 8
    config.run.run_dir, config.run.progress = tmp_path / "run", False
    config.run.policy, config.run.tokenizer = str(policy), str(tokenizer)
    config.env.prompts, config.env.prompt_column = str(prompts), "text"
    config.ppo.minibatch_size = config.ppo.micro_batch_size = 8
    config.env.max_new_tokens = 4
    final = train(config)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= set(load_prompts("train")[:8])
    assert (final / "tokenizer.json").is_file()  # the tokenizer travels with the trained policy
