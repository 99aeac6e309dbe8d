"""The shipped calculator task: its tokenizer, the calculator's replies, the reward, policy quality."""

import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textenv.arithmetic import load_rows as arithmetic_rows
from textenv.calculator import (
    ARTIFACTS_DIR,
    CALL,
    MAX_ENV_TOKENS,
    MAX_NEW_TOKENS,
    MAX_TURNS,
    POLICY_DIR,
    SEPARATOR,
    Calculator,
    final_answer,
    load_rows,
)
from textenv.calculator.__main__ import main
from textenv.calculator.data import BuildConfig, build_tokenizer, encode_transcripts, sft_corpus, sft_pairs, transcript
from textenv.calculator.report import Episode, episode_figures, reward, simulate, step
from textenv.turns import Interaction, Reply, Turn


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def policy():
    return AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()


def turn(prompt: str, text: str, index: int = 0) -> Turn:
    """The Turn the env would hand over when the agent's turn ``text`` + EOS ends (ids are placeholders)."""
    return Turn(prompt=prompt, row={}, context_ids=[3, 2], turn_ids=[3, 2], turn_text=text, index=index)


# ---------------------------------------------------------------- problems and corpus


def test_rows_are_the_arithmetic_tasks_and_the_corpus_avoids_them():
    assert load_rows("train") == arithmetic_rows("train") and load_rows("eval") == arithmetic_rows("eval")
    prompts = {r["prompt"] for r in load_rows("train") + load_rows("eval")}
    assert not prompts & {f"{a}+{b}=" for a, b in sft_pairs()}


def test_sft_corpus_is_deterministic_and_calls_the_tool_at_the_configured_share():
    config = BuildConfig()
    corpus = sft_corpus(sft_pairs(), config)
    assert corpus == sft_corpus(sft_pairs(), config) and len(corpus) == len(sft_pairs()) * config.sft_copies
    tool = [t for t in corpus if len(t) == 4]
    assert abs(len(tool) / len(corpus) - config.p_tool) < 0.02
    for (_, prompt), (_, call), (_, reply), (_, answer) in tool:  # always the call, the result, its copy
        a, b = map(int, prompt.removesuffix("=").split("+"))
        assert call == CALL and reply == f"{a + b}{SEPARATOR}" and answer == str(a + b)


def test_sft_labels_cover_the_agents_turns_only(tokenizer):
    ids, mask, labels = encode_transcripts(tokenizer, [transcript(7, 5, 12, tool=True), transcript(7, 5, 13, False)])
    enc, eos, pad = (lambda s: tokenizer(s)["input_ids"]), tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids[0].tolist() == enc("7+5=?") + [eos] + enc("12:12") + [eos]
    assert ids[1].tolist() == enc("7+5=13") + [eos] + [pad] * 5
    assert labels[0].tolist() == [-100] * 4 + enc("?") + [eos] + [-100] * 3 + enc("12") + [eos]
    assert labels[1].tolist() == [-100] * 4 + enc("13") + [eos] + [-100] * 5
    assert mask.tolist() == [[1] * 12, [1] * 7 + [0] * 5]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("which", ["shipped", "built"])
def test_tokenizer_is_one_token_per_character(which, tokenizer):
    tok = tokenizer if which == "shipped" else build_tokenizer()
    assert (tok.pad_token, tok.unk_token, tok.eos_token) == ("<pad>", "<unk>", "<eos>")
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == 17
    assert tok.convert_tokens_to_ids([CALL, SEPARATOR]) == [15, 16]
    text = f"17+25={CALL}42{SEPARATOR}42"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list(text) and tok.decode(ids) == text  # no BOS or EOS added
    with_eos = tok("17+25=?")["input_ids"] + [tok.eos_token_id] + tok("42:42")["input_ids"] + [tok.eos_token_id]
    assert tok.decode(with_eos, skip_special_tokens=True) == text
    assert tok.decode(with_eos) == "17+25=?<eos>42:42<eos>"
    for row in load_rows("eval"):
        assert tok(row["prompt"])["input_ids"] == build_tokenizer()(row["prompt"])["input_ids"]
        assert SEPARATOR not in row["answer"] and CALL not in row["answer"]
    assert tok("4 x")["input_ids"] == [tok("4")["input_ids"][0], tok.unk_token_id, tok.unk_token_id]


def test_suggested_limits_fit_every_episode(tokenizer):
    rows = load_rows("train") + load_rows("eval")
    assert max(len(tokenizer(r["answer"])["input_ids"]) + 1 for r in rows) <= MAX_NEW_TOKENS
    assert max(len(tokenizer(r["answer"] + SEPARATOR)["input_ids"]) for r in rows) <= MAX_ENV_TOKENS
    assert MAX_TURNS >= 2  # a call and an answer


# ---------------------------------------------------------------- the calculator


@pytest.mark.parametrize(
    ("prompt", "reply"), [("17+25=", "42:"), ("0+0=", "0:"), ("5+7=", "12:"), ("99+99=", "198:"), ("54+61=", "115:")]
)
def test_a_call_gets_the_sum_and_the_separator(prompt, reply):
    assert Calculator().respond(turn(prompt, CALL)) == Reply(text=reply)
    assert Calculator().respond(turn(prompt, CALL, index=2)) == Reply(text=reply)  # every call is answered


@pytest.mark.parametrize("text", ["42", "43", "", "??", "? ", "?42", "42?", ":", "42:42", "+", "abc"])
def test_anything_but_the_call_ends_the_episode(text):
    assert Calculator().respond(turn("17+25=", text)) == Reply(done=True)


def test_calculator_is_an_interaction_that_pickles_and_rejects_foreign_prompts():
    calculator = Calculator()
    assert isinstance(calculator, Interaction)
    assert pickle.loads(pickle.dumps(calculator)) == calculator
    with pytest.raises(ValueError, match="a\\+b="):
        calculator.respond(turn("what is 2+2?", CALL))


# ---------------------------------------------------------------- reward


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("42", 1.0),  # direct, right
        (" 42 ", 1.0),
        ("43", 0.0),  # direct, wrong
        ("?42:42", 1.0),  # tool, copied
        ("?42:43", 0.0),  # tool, copied wrong
        ("?42:", 0.0),  # tool, then an empty turn: the calculator's result is not the agent's answer
        ("?42:?", 0.0),  # tool, then another call cut off by the turn limit
        ("?42:?42:42", 1.0),  # two calls, then the copy
        ("", 0.0),
        ("?", 0.0),
        ("4242", 0.0),
        ("42+1", 0.0),
        ("abc", 0.0),
    ],
)
def test_final_answer(response, expected):
    row = {"prompt": "17+25=", "answer": "42"}
    assert final_answer(prompt="17+25=", response=response, response_ids=[], row=row) == expected


# ---------------------------------------------------------------- the shipped policy


def test_shipped_policy_loads_with_auto_classes(policy, tokenizer):
    assert policy.config.vocab_size == len(tokenizer) == 17
    assert policy.config.pad_token_id == tokenizer.pad_token_id != policy.config.eos_token_id == tokenizer.eos_token_id
    assert policy.config.n_positions == 256
    assert [getattr(policy.config, k) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")] == [0.0] * 3
    assert sum(f.stat().st_size for f in ARTIFACTS_DIR.rglob("*") if f.is_file()) < 1e6


def test_shipped_policy_sometimes_calls_copies_and_is_often_wrong_otherwise(policy, tokenizer):
    episodes = simulate(policy, tokenizer, load_rows("eval")[:64], generator=torch.Generator().manual_seed(0))
    figures = episode_figures(episodes, tokenizer)
    assert 0.3 < figures["episode/success"] < 0.85  # room for RL
    assert 0.05 < figures["tool/call_rate"] < 0.5
    assert figures["tool/copy_accuracy"] >= 0.9  # calling pays
    assert figures["policy/eos_rate"] >= 0.95


def test_simulation_loop_plays_the_protocol(tokenizer):
    """Hand-fed tokens through the report's loop: the Turns the calculator sees, its replies, the limits."""
    turns = []

    class Recording:
        def respond(self, turn: Turn) -> Reply:
            turns.append(turn)
            return Calculator().respond(turn)

    enc, eos = (lambda s: tokenizer(s)["input_ids"]), tokenizer.eos_token_id
    row = {"prompt": "17+25=", "answer": "42"}

    def play(tokens: list[int], max_turns: int = MAX_TURNS) -> Episode:
        episode = Episode(row, enc(row["prompt"]))
        for token in tokens:
            assert not episode.over
            step(episode, token, tokenizer, Recording(), max_turns, MAX_NEW_TOKENS)
        return episode

    episode = play(enc("?") + [eos] + enc("42") + [eos])
    assert episode.terminated and not episode.truncated
    assert episode.segments == [("agent", enc("?") + [eos]), ("env", enc("42:")), ("agent", enc("42") + [eos])]
    assert tokenizer.decode(episode.response_ids, skip_special_tokens=True) == "?42:42" and reward(episode, tokenizer)
    first, second = turns
    assert (first.prompt, first.row, first.index, first.turn_text, first.history) == (
        "17+25=",
        {"answer": "42"},
        0,
        "?",
        [],
    )
    assert first.context_ids == enc("17+25=?") + [eos] and first.turn_ids == enc("?") + [eos]
    assert second.index == 1 and second.turn_text == "42" and second.history == [("agent", "?"), ("env", "42:")]
    assert second.context_ids == enc("17+25=?") + [eos] + enc("42:42") + [eos]

    assert play(enc("43") + [eos]).terminated and not reward(play(enc("43") + [eos]), tokenizer)
    twice = play((enc("?") + [eos]) * 2, max_turns=2)  # a reply after the last allowed turn truncates
    assert twice.truncated and [s for s, _ in twice.segments] == ["agent", "env", "agent"]
    endless = play(enc("424242"))  # MAX_NEW_TOKENS without EOS truncates
    assert endless.truncated and endless.segments == [] and endless.response_ids == enc("424242")


def test_greedy_episodes_end_by_the_task(policy, tokenizer):
    episodes = simulate(policy, tokenizer, load_rows("eval")[:16], temperature=None)
    assert all(e.terminated and not e.truncated for e in episodes)


def test_report_command_prints_its_figures(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(["report", "--samples", "64", "--json-out", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert f"tool/call_rate          {report['tool/call_rate']:.4f}" in printed
    assert report["policy/n_samples"] == 64 and report["policy/n_prompts"] == 200
