"""agents/sft.py and agents/supervised.py: the response-only loss by hand, chat labels, the command end to end,
bitwise resume after Ctrl-C, and bad input refused with errors that name the fix."""

import json
import os
import re
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

import agents.sft as sft
from agents.packing import lm_packing_works, plan_packing
from agents.supervised import FitConfig, RunDirConfig, gpt2_config, learning_rate_factor, train_tokenizer
from textenv.loading import tokenize_prompts

ROWS = [{"prompt": f"say {w}:", "response": f" {w} {w}"} for w in ("ab", "ba", "cab", "bc", "ca", "acb", "cc", "ba")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def tiny_flags(run_dir, data, steps=6, **extra):
    flags = (
        dict(
            data=data,
            run_dir=run_dir,
            tokenizer_kind="characters",
            layers=1,
            width=16,
            heads=2,
            positions=32,
            steps=steps,
            batch_size=4,
            eval_every=3,
            checkpoint_every=2,
            log_every=1,
            eval_fraction=0.25,
            no_progress=None,
            sample_tokens=6,
        )
        | extra
    )
    return [f"--{k.replace('_', '-')}" + ("" if v is None else f"={v}") for k, v in flags.items()]


def test_response_only_loss_equals_the_hand_computed_cross_entropy():
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in ROWS], "characters", 0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tokenizer, 16, 1, 2, 32))
    data = sft.encode_demonstrations(ROWS[:2], tokenizer, sft.DemonstrationData(), 32, "demonstrations")
    expected_total, count = 0.0, 0
    for row, demo in enumerate(ROWS[:2]):
        prompt = tokenize_prompts([demo["prompt"]], tokenizer, 99, "error")[1][0]
        answer = tokenizer(demo["response"])["input_ids"] + [tokenizer.eos_token_id]
        tokens = prompt + answer
        assert data.ids[row, : len(tokens)].tolist() == tokens  # the prompt as the env tokenizes it, then the text
        assert data.labels[row, : len(tokens)].tolist() == [-100] * len(prompt) + answer
        logits = model(torch.tensor([tokens])).logits[0]
        for t in range(len(prompt), len(tokens)):  # token t is predicted at position t - 1
            expected_total -= torch.log_softmax(logits[t - 1], -1)[tokens[t]].item()
            count += 1
    loss = sft.response_loss(model, data.ids, data.mask, data.labels.masked_fill(data.mask == 0, -100))
    assert loss.item() == pytest.approx(expected_total / count, rel=1e-5)
    held_out = sft.held_out_loss(model, data, torch.device("cpu"))
    assert held_out == pytest.approx(expected_total / count, rel=1e-5)


def test_chat_messages_label_the_assistant_turns_only():
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer = train_tokenizer(["<user><assistant>|hi yo ok no"], "characters", 0)
    tokenizer.chat_template = template
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "no"},
    ]
    data = sft.encode_demonstrations([{"messages": messages}], tokenizer, sft.DemonstrationData(), 64, "chats")
    labelled = [t for t in data.labels[0].tolist() if t != -100]
    assert tokenizer.decode(labelled) == "yo|no|"  # each reply and the template's end of its turn
    assert tokenizer.decode(data.prompt_ids[0]) == "<user>hi|<assistant>"


def test_packed_demonstrations_give_the_padded_loss_and_gradients():
    tokenizer = train_tokenizer([r["prompt"] + r["response"] for r in ROWS], "characters", 0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(tokenizer, 16, 1, 2, 32))
    rows = ROWS[:3] + [{"prompt": "a:", "response": " b"}, {"prompt": "b:", "response": " a c"}] * 3  # ragged
    data = sft.encode_demonstrations(rows, tokenizer, sft.DemonstrationData(), 32, "demonstrations")
    assert plan_packing(data.ids, data.mask) is not None and lm_packing_works(model)  # this batch does pack
    results = []
    for pack in (False, True):
        model.zero_grad()
        loss = sft.batch_loss(data, torch.device("cpu"), pack=pack)(model, torch.arange(len(rows)))
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed == pytest.approx(padded, rel=1e-5)
    for a, b in zip(padded_grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    factors = [learning_rate_factor(step, 100) for step in range(100)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 5 warm-up steps of 100
    assert factors[5] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = write_jsonl(tmp / "demos.jsonl", ROWS * 4)
    sft.main(tiny_flags(tmp / "run", data, steps=30, learning_rate=1e-2))
    return tmp / "run", data


def test_the_command_trains_logs_and_writes_a_loadable_policy(sft_run):
    run_dir, _ = sft_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/loss" in row]
    assert evals[0]["iteration"] == -1 and evals[-1]["iteration"] == 29  # before training, and after the last step
    assert evals[-1]["eval/loss"] < 0.6 * evals[0]["eval/loss"]
    assert evals[-1]["eval/perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval/loss"], rel=1e-6)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"].startswith("say ") for s in samples)
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert policy.config.vocab_size == len(tokenizer) and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (run_dir / "learning_curve.png").stat().st_size > 0 and (run_dir / "metrics.csv").is_file()


def interrupt_at(monkeypatch, module, name, call: int):
    """SIGINT to this process during the ``call``-th call of ``module.name`` (as Ctrl-C would)."""
    original, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def final_weights(run_dir, auto=AutoModelForCausalLM):
    return auto.from_pretrained(run_dir / "final").state_dict()


def test_a_run_stopped_by_ctrl_c_resumes_bitwise(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "demos.jsonl", ROWS * 2)
    sft.main(tiny_flags(tmp_path / "straight", data))
    interrupt_at(monkeypatch, torch.nn.utils, "clip_grad_norm_", call=4)  # during step 3 (0-based): stops after it
    with pytest.raises(SystemExit) as stopped:
        sft.main(tiny_flags(tmp_path / "stopped", data))
    assert stopped.value.code == 128 + signal.SIGINT
    assert (tmp_path / "stopped" / "latest").read_text() == "checkpoint-000003"
    monkeypatch.undo()
    sft.main(["--run-dir", str(tmp_path / "stopped"), "--resume"])  # the settings come from config.json
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    rows = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["iteration"] for line in rows]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice after the resume


def test_resume_refuses_a_changed_setting(tmp_path):
    data = write_jsonl(tmp_path / "demos.jsonl", ROWS * 2)
    sft.main(tiny_flags(tmp_path / "run", data, steps=2))
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 -> 0.5"):
        sft.train_sft(
            sft.SFTConfig(
                data=sft.DemonstrationData(data=data, eval_fraction=0.25),
                fit=FitConfig(steps=4, batch_size=4, learning_rate=0.5),
                run=RunDirConfig(run_dir=tmp_path / "run", resume=True),
            )
        )


def test_lora_trains_adapters_and_final_holds_them_merged(tmp_path, sft_run):
    run_dir, data = sft_run
    sft.main(
        ["--data", data, "--model", str(run_dir / "final"), "--run-dir", str(tmp_path / "lora"), "--steps", "4"]
        + ["--batch-size", "4", "--lora-rank", "2", "--no-progress", "--eval-fraction", "0.25"]
    )
    base, tuned = final_weights(run_dir), final_weights(tmp_path / "lora")
    assert base.keys() == tuned.keys()  # a plain model, no adapter names
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all("attn" in k for k in changed)  # only the adapted (attention) weights moved


# ---------------------------------------------------------------- bad input


def refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        sft.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"prompt": "a", "answer": "b"}] * 8, r"row 0 has no 'response' field"),
        ([{"prompt": "a", "response": "  "}] * 8, r"'response' is empty"),
        ([{"prompt": "a", "response": 3}] * 8, r"'response' must be a string"),
        ([{"text": "a"}] * 8, r"line 1, has neither a 'prompt' nor a 'messages' field; name them with --prompt-column"),
    ],
)
def test_bad_rows_are_refused_by_row_and_field(tmp_path, capsys, rows, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert re.search(expected, refused(capsys, tiny_flags(tmp_path / "run", data)))
    assert not (tmp_path / "run" / "checkpoint-000000").exists()


def test_a_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "caf\u00e9", "response": "x"}).encode("utf-8").replace(b"\\u00e9", b"\xe9"))
    assert "is not UTF-8 text" in refused(capsys, tiny_flags(tmp_path / "run", str(path)))


def test_too_long_demonstrations_are_refused_or_cut_with_a_count(tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", ROWS * 2)
    error = refused(capsys, tiny_flags(tmp_path / "run", data, positions=8))
    assert "longer than the model's 8 positions" in error and "--truncate" in error
    sft.main(tiny_flags(tmp_path / "cut", data, positions=8, steps=2, truncate=None))
    assert "--truncate cut" in capsys.readouterr().err


def save_model_with_tokenizer(tmp_path, pad: str | None, model_class=GPT2LMHeadModel):
    tokenizer = train_tokenizer(["say ab: ab ab"], "characters", 0)
    if pad == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    model = model_class(gpt2_config(tokenizer, 16, 1, 2, 32))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    if pad is None:  # a tokenizer saved without PAD
        config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
        config.pop("pad_token", None)
        (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path / "model")


@pytest.mark.parametrize(
    "pad, model_class, expected",
    [
        ("eos", GPT2LMHeadModel, "uses its EOS token '<eos>' as PAD"),
        (None, GPT2LMHeadModel, "has no PAD token"),
        ("pad", GPT2ForSequenceClassification, "holds a GPT2ForSequenceClassification, not a causal LM"),
    ],
)
def test_a_model_or_tokenizer_of_the_wrong_kind_is_refused(tmp_path, capsys, pad, model_class, expected):
    model = save_model_with_tokenizer(tmp_path, pad, model_class)
    data = write_jsonl(tmp_path / "demos.jsonl", ROWS)
    error = refused(capsys, ["--data", data, "--model", model, "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert expected in error


def test_demonstrations_as_a_list_of_dicts_from_python(tmp_path):
    config = sft.SFTConfig(
        data=sft.DemonstrationData(data=ROWS * 2, eval_fraction=0.25),
        model=sft.ModelSource(tokenizer_kind="characters", layers=1, width=16, heads=2, positions=32),
        fit=FitConfig(steps=2, batch_size=4),
        run=RunDirConfig(run_dir=tmp_path / "run", progress=False),
    )
    final = sft.train_sft(config)
    assert AutoModelForCausalLM.from_pretrained(final).config.n_layer == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["data"] == ROWS * 2
