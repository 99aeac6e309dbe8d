"""Data-parallel PPO under torchrun: 2 processes on CPU with the gloo backend."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from textenv.default_task import POLICY_DIR

SMALL = [
    "--batch-size", "8", "--minibatch-size", "8", "--micro-batch-size", "8", "--eval-every", "3",
    "--eval-episodes", "8", "--max-new-tokens", "10", "--no-progress",
]  # fmt: skip


def torchrun(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "agents", "--run-dir", str(run_dir), *SMALL, *extra]  # fmt: skip


def run_ok(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpointed(run_dir) -> int:
    pointer = run_dir / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.exists() else -1


@pytest.mark.slow
def test_ddp_ranks_stay_identical_and_metrics_are_cross_rank_means(tmp_path):
    run = tmp_path / "ddp"
    run_ok(torchrun(run, "--iterations", "4"))
    logged = [r for r in rows(run / "metrics.jsonl") if "env/score" in r]
    rank0, rank1 = rows(run / "metrics-rank0.jsonl"), rows(run / "metrics-rank1.jsonl")
    assert [r["iteration"] for r in logged] == [0, 1, 2, 3]
    for row, a, b in zip(logged, rank0, rank1):
        assert row["dist/parameter_spread"] == 0.0  # the replicas hold identical weights after every update
        for key in ("env/score", "env/kl", "loss/policy", "ppo/approx_kl", "policy/entropy"):
            assert row[key] == pytest.approx((a[key] + b[key]) / 2, rel=1e-9, abs=1e-12)
    # each rank stepped its own shard of episodes
    assert any(a["env/score"] != b["env/score"] for a, b in zip(rank0, rank1))
    AutoModelForCausalLM.from_pretrained(run / "final")


@pytest.mark.slow
def test_ddp_run_killed_with_sigkill_resumes(tmp_path):
    run = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    log = log_path.open("w")  # a file, not a pipe: a full pipe would stall the run
    process = subprocess.Popen(torchrun(run, "--iterations", "10"), stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 300
    while checkpointed(run) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "ended before it could be killed: " + log_path.read_text()[-2000:]
    # torchrun starts each worker in a session of its own: kill the whole tree, workers first
    tree = psutil.Process(process.pid).children(recursive=True)
    for child in tree:
        child.send_signal(signal.SIGKILL)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    psutil.wait_procs(tree, timeout=30)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in tree)
    saved = checkpointed(run)
    assert saved >= 2, log_path.read_text()[-2000:]
    assert max(r["iteration"] for r in rows(run / "metrics.jsonl")) <= saved + 1
    run_ok(torchrun(run, "--iterations", "10", "--resume"))
    assert [r["iteration"] for r in rows(run / "metrics.jsonl") if "env/score" in r] == list(range(10))
    for rank in (0, 1):
        assert [r["iteration"] for r in rows(run / f"metrics-rank{rank}.jsonl")] == list(range(10))


@pytest.mark.slow
def test_fsdp_run_saves_a_full_model(tmp_path):
    run = tmp_path / "fsdp"
    run_ok(torchrun(run, "--iterations", "2", "--fsdp"))
    assert [r["iteration"] for r in rows(run / "metrics.jsonl") if "env/score" in r] == [0, 1]
    trained = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()  # gathered from the shards
    initial = AutoModelForCausalLM.from_pretrained(POLICY_DIR).state_dict()
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "reward_model"])
def test_supervised_steps_under_torchrun_keep_the_replicas_identical(tmp_path, command):
    examples = [{"prompt": f"say {w}:", "response": f" {w} {w}", "chosen": f" {w} {w}", "rejected": f" {w}"} for w in
            ("ab", "ba", "cab", "bc", "ca", "acb", "cc", "bb")] * 2  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples))
    flags = ["--data", str(data), "--steps", "4", "--batch-size", "4", "--log-every", "1", "--no-progress"]
    tiny = ["--model", "scratch", "--tokenizer-kind", "characters", "--layers", "1", "--width", "16", "--heads", "2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    run_ok([*launch, f"agents.{command}", "--run-dir", str(tmp_path / "run"), *flags, *tiny, "--positions", "32"])
    logged = [r for r in rows(tmp_path / "run" / "metrics.jsonl") if "dist/parameter_spread" in r]
    assert [r["iteration"] for r in logged] == [0, 1, 2, 3]
    assert all(r["dist/parameter_spread"] == 0.0 for r in logged)
    assert (tmp_path / "run" / "final" / "config.json").is_file()
