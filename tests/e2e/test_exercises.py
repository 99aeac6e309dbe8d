"""The walkthrough notebook runs, and the numbers in docs/exercises-answers.md are those the examples produce.

``examples/walkthrough.py`` (a jupytext percent-format notebook, executable as plain
Python) runs examples 01-12 and 14 with their default settings in one process. Each
answer in the answers file carries comments of the form

    <!-- check FILE.json | EXPRESSION over d (the JSON) | VALUE -->

and the test evaluates every expression on the JSON the run wrote and compares it
with VALUE, to the precision VALUE is written with; a numeric VALUE must also
appear in the answer's visible text.
"""

import json
import math
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ROOT / "docs" / "exercises-answers.md"
CHECK = re.compile(r"<!-- check (\S+\.json) \| (.+?) \| (\S+) -->")
FIGURES = [
    "01_agent_env_loop.png", "02_observation_window.png", "03_returns_and_discount.png", "04_four_roles.png",
    "05_kl_per_token.png", "05_kl_heatmap.png", "05_kl_per_response.png", "06_value_head.png",
    "07_prefix_scores.png", "07_reward_heatmap.png", "08_actor_loss.png", "09_advantage_heatmap.png",
    "09_gae_episode.png", "10_ppo_ratio_clipping.png", "11_critic_loss.png", "12_learning_curve.png",
    "12_scores_before_after.png", "14_ppo_grpo_rloo.png",
]  # fmt: skip


def answer_blocks() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(visible text, checks) of each answer: blocks start with a bold number like **8.1**."""
    blocks = re.split(r"\n(?=\*\*\d+\.\d+\*\*)", ANSWERS.read_text())[1:]
    return [(CHECK.sub("", block), CHECK.findall(block)) for block in blocks]


def matches(actual, written: str) -> bool:
    if written in ("True", "False"):
        return actual is (written == "True")
    if written.endswith("%"):
        return abs(float(actual) - float(written[:-1]) / 100) <= 10 ** -(_decimals(written[:-1]) + 2) + 1e-9
    if "." not in written:
        return actual == int(written)
    return abs(float(actual) - float(written)) <= 10 ** -_decimals(written) + 1e-9  # one unit in the last place


def _decimals(number: str) -> int:
    return len(number.split(".")[1]) if "." in number else 0


def test_answers_file_is_well_formed():
    blocks = answer_blocks()
    assert len(blocks) >= 20
    for text, checks in blocks:
        assert checks, f"an answer without a check: {text[:60]!r}"


@pytest.mark.slow
def test_walkthrough_runs_and_answers_match(tmp_path, monkeypatch):
    walkthrough = ROOT / "examples" / "walkthrough.py"
    monkeypatch.setattr(sys, "argv", [str(walkthrough), "--out", str(tmp_path)])
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # restores sys.path, which the walkthrough extends
    runpy.run_path(str(walkthrough), run_name="__main__")
    for name in FIGURES:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, name
    loaded = {}
    for text, checks in answer_blocks():
        for file, expression, written in checks:
            d = loaded.setdefault(file, json.loads((tmp_path / file).read_text()))
            actual = eval(expression, {"math": math}, {"d": d})  # the expressions are this repository's own text
            assert matches(actual, written), f"{file}: {expression} = {actual!r}, the answers say {written}"
            if written not in ("True", "False"):
                assert written in text, f"{written} is checked but not shown in the answer {text[:60]!r}"
