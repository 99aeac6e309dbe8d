"""agents/evaluate.py: evaluation that measures what it says (``python -m agents.evaluate``).

- pass@k and the summary by hand, every eval prompt answered k times, the command's JSON, reproducible for a seed,
  and the same figures as the trainer's evaluation.
- The KL is to the evaluated policy's own reference: a training run's starting policy (from its config.json), or
  ``--reference-model``; a policy whose starting point is unknown is refused, not compared with the task's SFT model.
- ``--tokenizer`` gives a policy saved without one its tokenizer.
- ``--accuracy-term`` names the reward function that counts as right (accuracy, pass@k); without one the command
  says which figures it cannot compute and why.
- The fraction of scores above 0 is ``positive_rate`` on the review task, ``score_gt0_rate`` elsewhere.
- ``--json`` into a path that cannot be written is refused before the evaluation.
"""

import json
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import agents.evaluate
from agents.__main__ import main as train_main
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


# --------------------------------------------------------------------------- what the command measures
FAST = ["--num-prompts", "4", "--k", "2", "--batch-size", "8", "--max-new-tokens", "4", "--device", "cpu"]
TRAIN = [
    "--iterations", "1", "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "4", "--epochs", "1",
    "--eval-every", "10", "--eval-episodes", "4", "--max-new-tokens", "4", "--no-progress", "--threads", "1",
]  # fmt: skip


def evaluated(argv, capsys, tmp_path) -> tuple[dict, str, str]:
    """The JSON record, stdout and stderr of one evaluation."""
    out = tmp_path / f"eval{len(list(tmp_path.glob('eval*.json')))}.json"
    main([*argv, *FAST, "--json", str(out)])
    printed = capsys.readouterr()
    return json.loads(out.read_text()), printed.out, " ".join(printed.err.split())


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


@pytest.fixture(scope="module")
def own_sft(tmp_path_factory):
    """A policy of the review task's vocabulary that is not the task's SFT model (its weights moved by noise), and a
    1-iteration run trained from it at a learning rate too small to move it."""
    root = tmp_path_factory.mktemp("own_sft")
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(root / "sft")
    AutoTokenizer.from_pretrained(POLICY_DIR).save_pretrained(root / "sft")
    model.save_pretrained(root / "sft_without_tokenizer")
    train_main(["--run-dir", str(root / "run"), "--policy", str(root / "sft"), "--learning-rate", "1e-12", *TRAIN])
    return root


def test_the_kl_of_a_run_is_to_the_policy_it_started_from(own_sft, tmp_path, capsys):
    for policy in (own_sft / "run" / "final", own_sft / "run"):  # the run's final/, or the run itself
        record, _, err = evaluated(["--policy", str(policy)], capsys, tmp_path)
        assert record["reference_model"] == str(own_sft / "sft")
        assert record["policy"] == str(own_sft / "run" / "final")
        assert abs(record["kl"]) < 1e-3, record["kl"]  # the run barely moved from its own start
        assert f"the KL is to the reference model {own_sft / 'sft'} (the policy {own_sft / 'run'} started from" in err
    # the task's SFT model is another policy's reference: measured against it, the same policy is far away
    record, _, _ = evaluated(
        ["--policy", str(own_sft / "run" / "final"), "--reference-model", str(POLICY_DIR)], capsys, tmp_path
    )
    assert record["kl"] > 1.0 and record["reference_model"] == str(POLICY_DIR)


def test_a_policy_of_unknown_start_needs_a_reference_model(own_sft, tmp_path, capsys):
    err = refused(["--policy", str(own_sft / "sft"), *FAST], capsys)
    assert "the KL to the reference needs the policy's own starting point" in err
    assert "neither the task's SFT model nor a training run's" in err and "Pass --reference-model" in err
    record, _, err = evaluated(
        ["--policy", str(own_sft / "sft"), "--reference-model", str(own_sft / "sft")], capsys, tmp_path
    )
    assert abs(record["kl"]) < 1e-4 and "(--reference-model)" in err
    record, _, _ = evaluated([], capsys, tmp_path)  # the task's SFT model is its own reference
    assert abs(record["kl"]) < 1e-4 and record["reference_model"] == str(POLICY_DIR)


def test_the_tokenizer_flag(own_sft, tmp_path, capsys):
    bare = str(own_sft / "sft_without_tokenizer")
    err = refused(["--policy", bare, "--reference-model", bare, *FAST], capsys)
    assert f"--policy {bare} holds no tokenizer (no tokenizer.json or tokenizer_config.json): pass --tokenizer" in err
    record, _, _ = evaluated(
        ["--policy", bare, "--reference-model", bare, "--tokenizer", str(POLICY_DIR)], capsys, tmp_path
    )
    assert record["episodes"] == 8


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    name = f"answers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
        def right(response, row, **kwargs):
            return float(response.strip() == row["answer"])
        """)
    )
    yield name
    sys.modules.pop(name, None)


def test_accuracy_needs_an_answer_check_and_says_so(reward_module, tmp_path, capsys):
    task = ["--task", "arithmetic", "--reward-fn", f"{reward_module}:right"]
    record, out, err = evaluated(task, capsys, tmp_path)
    assert "accuracy" not in record and "pass@k" not in record and "| pass@" not in out
    note = (
        "accuracy and pass@2 are not computed: with --reward-fn, the task's answer check 'exact_match' does not pay, "
        "and no --accuracy-term names one of the reward functions ['right']"
    )
    assert note in err and any(note in n for n in record["notes"])
    record, out, err = evaluated([*task, "--accuracy-term", "right"], capsys, tmp_path)
    assert record["accuracy"] == record["reward/right"] and 0 <= record["pass@k"] <= 1
    assert "| accuracy |" in out and "| pass@2 |" in out and "not computed" not in err


def test_the_rate_of_scores_above_zero_is_named_for_what_it_means(tmp_path, capsys):
    record, out, _ = evaluated(["--task", "arithmetic"], capsys, tmp_path)
    assert "score_gt0_rate" in record and "positive_rate" not in record
    assert "| score>0 rate |" in out and "positive" not in out
    record, out, _ = evaluated([], capsys, tmp_path)  # reviews: a score above 0 is a positive review
    assert "positive_rate" in record and "| positive_rate |" in out


def test_prompts_of_your_own_without_splits_are_all_evaluated(tmp_path, capsys):
    prompts = tmp_path / "mine.txt"
    prompts.write_text("The movie was\nI thought the film\n")
    record, _, _ = evaluated(["--task", "reviews", "--prompts", str(prompts), "--num-prompts", "2"], capsys, tmp_path)
    assert record["episodes"] == 4  # 2 prompts x k = 2, though evaluation's split is "eval"


def test_an_unwritable_json_path_is_refused_before_evaluating(tmp_path, capsys, monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking --json")

    monkeypatch.setattr(agents.evaluate, "evaluate_policy", no_evaluation)
    (tmp_path / "a_file").write_text("")
    err = refused(["--json", str(tmp_path / "a_file" / "sub" / "out.json"), *FAST], capsys)
    assert f"--json {tmp_path / 'a_file' / 'sub' / 'out.json'}: {tmp_path / 'a_file'} is a file, not a folder" in err
    err = refused(["--json", str(tmp_path), *FAST], capsys)
    assert "is a folder; name a file" in err
