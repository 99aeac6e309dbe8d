"""agents/reward_model.py: the Bradley-Terry loss by hand, the calibration, and the command (see test_sft.py)."""

import json
import math
import signal

import gymnasium as gym
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2ForSequenceClassification

import agents.reward_model as reward_model
import agents.sft as sft
import textenv  # noqa: F401  (registers TokenRLHF-v0)
from agents.reward_model import bradley_terry_loss, calibrate_reward_model
from agents.supervised import split_rows
from tests.agents.test_sft import final_weights, interrupt_at, tiny_flags, write_jsonl
from tests.models import tiny_gpt2_config, tiny_gpt2_reward_model, uncached_score
from textenv.lm import pad_batch, sequence_scores


def test_bradley_terry_loss_hand_values():
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2; -log sigmoid(-2) = log(1 + e^2)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.e**-1)
    )
    assert bradley_terry_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(math.log(2))
    mean = (math.log(1 + math.e**-1) + math.log(1 + math.e**2)) / 2
    assert bradley_terry_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(mean)


def test_bradley_terry_loss_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_calibration_centres_neutral_texts_and_scales_to_unit_std():
    model = tiny_gpt2_reward_model()
    everything = pad_batch([[i, i + 1, i + 2] for i in range(1, 40)], 0)
    neutral = pad_batch([[i, i + 1, i + 2] for i in range(1, 10)], 0)
    before = sequence_scores(model, *everything)
    calibrate_reward_model(model, neutral=neutral, everything=everything)
    after = sequence_scores(model, *everything)
    assert sequence_scores(model, *neutral).mean().item() == pytest.approx(0.0, abs=1e-5)
    assert after.std().item() == pytest.approx(1.0, abs=1e-4)
    # an affine map of the old scores: the ranking is unchanged
    assert torch.equal(before.argsort(), after.argsort())


# ---------------------------------------------------------------- the command


PAIRS = [
    {"prompt": f"say {w}:", "chosen": f" {w} {w}", "rejected": f" {v} {w}"}
    for w, v in (("ab", "ca"), ("ba", "cc"), ("cab", "bca"), ("bc", "aa"), ("ca", "bb"), ("acb", "cba"))
]


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    demos = write_jsonl(tmp / "demos.jsonl", [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS] * 3)
    sft.main(tiny_flags(tmp / "sft", demos, steps=4))
    return tmp / "sft" / "final", write_jsonl(tmp / "prefs.jsonl", PAIRS * 4)


def rm_flags(run_dir, data, model, steps=6, **extra):
    flags = (
        dict(
            data=data,
            model=model,
            run_dir=run_dir,
            steps=steps,
            batch_size=4,
            eval_every=3,
            checkpoint_every=2,
            eval_fraction=0.25,
            no_progress=None,
            log_every=1,
        )
        | extra
    )
    return [f"--{k.replace('_', '-')}" + ("" if v is None else f"={v}") for k, v in flags.items()]


def test_the_reward_model_is_a_valid_reward_model_for_the_env(tmp_path, sft_policy):
    policy, prefs = sft_policy
    reward_model.main(rm_flags(tmp_path / "rm", prefs, policy, steps=20, learning_rate=1e-2))
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["iteration"] == -1 and "eval/accuracy" in rows[0]  # the starting point, before training
    losses = [row["loss/train"] for row in rows if "loss/train" in row]
    assert sum(losses[-5:]) < sum(losses[:5])  # the Bradley-Terry loss falls
    final = tmp_path / "rm" / "final"
    scorer = AutoModelForSequenceClassification.from_pretrained(final).eval()
    env = gym.make(
        "TokenRLHF-v0", reference_model=str(policy), reward_model=str(final), prompts=["say ab:"], max_new_tokens=12
    )
    observation, info = env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
    tokens = [t for t, m in zip(observation["input_ids"], observation["attention_mask"]) if m]
    assert info["score"] == pytest.approx(uncached_score(scorer, tokens), abs=1e-5)  # read at the last real token


def test_calibration_centres_and_scales_the_training_scores_and_keeps_the_ranking(tmp_path, sft_policy):
    policy, prefs = sft_policy
    reward_model.main(rm_flags(tmp_path / "rm", prefs, policy))
    report = json.loads((tmp_path / "rm" / "calibration.json").read_text())
    assert report["after/accuracy"] == report["before/accuracy"] and report["scale"] > 0
    config = reward_model.PreferenceData(data=prefs)
    train_rows, _ = split_rows(prefs, None, "prompt", 0.25, 0, "--data")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm" / "final")
    pairs = reward_model.encode_preferences(train_rows, tokenizer, config, 32, 0, "pairs")
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final").eval()
    scores = torch.cat([sequence_scores(scorer, *pairs.chosen), sequence_scores(scorer, *pairs.rejected)])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4) and scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_a_reward_model_run_stopped_by_ctrl_c_resumes_bitwise(tmp_path, sft_policy, monkeypatch):
    policy, prefs = sft_policy
    reward_model.main(rm_flags(tmp_path / "straight", prefs, policy))
    interrupt_at(monkeypatch, torch.nn.utils, "clip_grad_norm_", call=3)  # during step 2: stops after it
    with pytest.raises(SystemExit) as stopped:
        reward_model.main(rm_flags(tmp_path / "stopped", prefs, policy))
    assert stopped.value.code == 128 + signal.SIGINT
    monkeypatch.undo()
    reward_model.main(["--run-dir", str(tmp_path / "stopped"), "--resume"])
    straight = final_weights(tmp_path / "straight", AutoModelForSequenceClassification)
    resumed = final_weights(tmp_path / "stopped", AutoModelForSequenceClassification)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_bad_pairs_and_models_are_refused(tmp_path, sft_policy, capsys):
    policy, _ = sft_policy
    same = write_jsonl(tmp_path / "same.jsonl", PAIRS + [{"prompt": "say a:", "chosen": " a", "rejected": " a"}])
    for data, model, expected in (
        (same, policy, "row 6: chosen and rejected are the same text"),
        (write_jsonl(tmp_path / "nochosen.jsonl", [{"prompt": "a", "better": "b"}] * 4), policy, "no 'chosen' field"),
    ):
        with pytest.raises(SystemExit):
            reward_model.main(rm_flags(tmp_path / "run", data, model, eval_fraction=0))
        assert expected in capsys.readouterr().err
    two_labels = tmp_path / "two_labels"
    GPT2ForSequenceClassification(tiny_gpt2_config(40, num_labels=2)).save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(policy).save_pretrained(two_labels)
    with pytest.raises(SystemExit):
        reward_model.main(rm_flags(tmp_path / "run", same, two_labels))
    assert "num_labels=1" in capsys.readouterr().err or "one label" in capsys.readouterr().err


def test_chat_pairs_share_every_message_but_the_reply():
    data = reward_model.PreferenceData()
    user = [{"role": "user", "content": "hi"}]
    row = {
        "chosen": user + [{"role": "assistant", "content": "hello"}],
        "rejected": user + [{"role": "assistant", "content": "go"}],
    }
    assert reward_model.preference_texts([row], data, "pairs") == ([user], ["hello"], ["go"])
    row["rejected"] = [{"role": "user", "content": "other"}, {"role": "assistant", "content": "go"}]
    with pytest.raises(ValueError, match="must share every message but the last"):
        reward_model.preference_texts([row], data, "pairs")


def test_every_evaluation_is_logged_whatever_log_every(tmp_path, sft_policy):
    # evaluations at steps 2 and 5 (every 3), rows at every second step: step 2's evaluation is logged all the same
    policy, prefs = sft_policy
    reward_model.main(rm_flags(tmp_path / "rm", prefs, policy, log_every=2) + ["--no-calibrate"])
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows if "eval/accuracy" in row] == [-1, 2, 5]
