"""The walkthrough notebook runs, the numbers in docs/exercises-answers.md are those the examples produce, and
examples/check_exercises.py tells a right implementation of the exercises from a wrong one.

``examples/walkthrough.py`` (a jupytext percent-format notebook, executable as plain
Python) runs every example, 01-15, with its default settings in one process (the
``walkthrough_out`` fixture, shared with tests/e2e/test_doc_numbers.py). Each answer in
the answers file carries comments of the form

    <!-- check FILE.json | EXPRESSION over d (the JSON) | VALUE -->

and the test evaluates every expression on the JSON the run wrote and compares it
with VALUE, at the precision VALUE is written with (rounded to its last digit); a
numeric VALUE must also appear in the answer's visible text.

The checker is run on the stubs in examples/exercises/ (not written yet), on a right
solution and on a wrong one, both kept under tests/e2e/exercise_solutions/ so that the
examples do not ship the answer.
"""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ROOT / "docs" / "exercises-answers.md"
CHECK = re.compile(r"<!-- check (\S+\.json) \| (.+?) \| (\S+) -->")
FIGURES = [
    "01_agent_env_loop.png", "02_observation_window.png", "03_returns_and_discount.png", "04_four_roles.png",
    "04_four_models.png", "05_kl_per_token.png", "05_kl_heatmap.png", "05_kl_per_response.png",
    "06_value_head.png", "07_prefix_scores.png", "07_reward_heatmap.png", "08_actor_loss.png",
    "09_advantage_heatmap.png", "09_gae_episode.png", "10_ppo_ratio_clipping.png", "11_critic_loss.png",
    "12_learning_curve.png", "12_scores_before_after.png", "13_what_goes_wrong.png", "14_ppo_grpo_rloo.png",
    "15_multi_turn.png",
]  # fmt: skip
SOLUTIONS = Path(__file__).resolve().parent / "exercise_solutions"


def answer_blocks() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(visible text, checks) of each answer: blocks start with a bold number like **8.1**."""
    blocks = re.split(r"\n(?=\*\*\d+\.\d+\*\*)", ANSWERS.read_text())[1:]
    return [(CHECK.sub("", block), CHECK.findall(block)) for block in blocks]


def matches(actual, written: str) -> bool:
    if written in ("True", "False"):
        return actual is (written == "True")
    if written.endswith("%"):  # rounded to the written number of decimals of a percentage
        return abs(float(actual) * 100 - float(written[:-1])) <= 0.5 * 10 ** -_decimals(written[:-1]) + 1e-9
    if "." not in written and isinstance(actual, int):
        return actual == int(written)
    return abs(float(actual) - float(written)) <= 0.5 * 10 ** -_decimals(written) + 1e-9  # rounded to the last digit


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def test_answers_file_is_well_formed():
    blocks = answer_blocks()
    assert len(blocks) >= 20
    for text, checks in blocks:
        assert checks, f"an answer without a check: {text[:60]!r}"


@pytest.mark.slow
def test_walkthrough_runs_and_answers_match(walkthrough_out):
    from tests.e2e.test_examples import assert_png

    for name in FIGURES:
        assert_png(walkthrough_out / name)
    loaded = {}
    for text, checks in answer_blocks():
        for file, expression, written in checks:
            d = loaded.setdefault(file, json.loads((walkthrough_out / file).read_text()))
            actual = eval(expression, {"math": math}, {"d": d})  # the expressions are this repository's own text
            assert matches(actual, written), f"{file}: {expression} = {actual!r}, the answers say {written}"
            if written not in ("True", "False"):
                assert written in text, f"{written} is checked but not shown in the answer {text[:60]!r}"


def checker():
    """examples/check_exercises.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("check_exercises", ROOT / "examples" / "check_exercises.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checker_passes_a_right_solution(capsys):
    assert checker().main(["--solutions", str(SOLUTIONS / "right"), "--cases", "30"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "3 of 3 passed" in out


def test_checker_names_the_first_mismatch_of_a_wrong_solution(capsys):
    assert checker().main(["--solutions", str(SOLUTIONS / "wrong"), "--cases", "30"]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL") == 3 and "0 of 3 passed" in out
    # each failure says which output, which entry, both numbers and the row it came from
    assert re.search(r"FAIL  gae: case \d+ of 30: advantages\[\d+, \d+\]: yours [-+]\d", out)
    assert "the episode is terminated (EOS)" in out  # the wrong GAE bootstraps after EOS
    assert "gradient of the loss with respect to logprobs" in out  # the wrong loss has the right value
    assert re.search(r"FAIL  kl_penalty: case 1 of 30: reward\[0, 0\]: yours \+[\d.]+, the library's -", out)


def test_checker_on_the_shipped_stubs_says_what_is_left_to_write(capsys):
    assert checker().main(["--only", "gae", "--only", "kl_penalty"]) == 1
    out = capsys.readouterr().out
    assert "TODO  gae" in out and "TODO  kl_penalty" in out and "policy_loss" not in out
    for stub in (ROOT / "examples" / "exercises").glob("my_*.py"):  # the shipped files are stubs, not answers
        assert "raise NotImplementedError" in stub.read_text(), stub
