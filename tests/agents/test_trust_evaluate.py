"""Evaluation that measures what it says (``python -m agents.evaluate``), and what a run logs of its episodes.

- The KL is to the evaluated policy's own reference: a training run's starting policy (from its config.json), or
  ``--reference-model``; a policy whose starting point is unknown is refused, not compared with the task's SFT model.
- ``--tokenizer`` gives a policy saved without one its tokenizer.
- ``--accuracy-term`` names the reward function that counts as right (accuracy, pass@k); without one the command
  says which figures it cannot compute and why.
- The fraction of scores above 0 is ``positive_rate`` on the review task, ``score_gt0_rate`` elsewhere.
- ``--json`` into a path that cannot be written is refused before the evaluation.
- ``samples.jsonl`` shows the prompt the policy saw (after left truncation) beside the prompt as given.
- The training run's eval env scores with the reward model's own tokenizer, as the training env does.
"""

import json
import shutil
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

import agents.evaluate
from agents.__main__ import main as train_main
from agents.evaluate import main
from agents.train import TrainConfig, Trainer
from textenv.default_task import POLICY_DIR
from textenv.scorers import TextScorer

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


def test_samples_show_the_prompt_the_policy_saw(tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    long = "The film opened with a long and slow shot of the sea, and then the actors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{long}\n{long} were\n{long} said\n{long} felt\n")
    flags = ["--prompts", str(prompts), "--eval-prompts", str(prompts), "--prompt-truncation", "left"]
    train_main(["--run-dir", str(tmp_path / "run"), *flags, "--max-prompt-tokens", "4", *TRAIN])
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for sample in samples:
        kept = tokenizer(sample["prompt_text"])["input_ids"][-4:]
        assert sample["prompt"] == tokenizer.decode(kept) and sample["prompt_text"].startswith(long)


def test_the_eval_env_scores_with_the_reward_models_own_tokenizer(tmp_path):
    from tests.textenv.test_reward_tokenizer import character_tokenizer

    tokenizer = character_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1)
    config.pad_token_id = tokenizer.pad_token_id
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "char_rm")
    tokenizer.save_pretrained(tmp_path / "char_rm")

    train = TrainConfig()
    train.env.reward_model, train.env.max_new_tokens = str(tmp_path / "char_rm"), 4
    train.run.run_dir, train.run.progress, train.run.device, train.run.threads = tmp_path / "run", False, "cpu", 1
    train.run.batch_size, train.run.eval_episodes = 16, 4
    trainer = Trainer(train)
    try:
        assert isinstance(trainer.env.unwrapped.core.scorer, TextScorer)
        assert isinstance(trainer.eval_env.unwrapped.core.scorer, TextScorer)  # not the policy's token ids
        trainer.evaluate(0)
    finally:
        trainer.logger.close()
    shutil.rmtree(tmp_path / "run")
