"""The README's Python blocks run as written (those with ``...`` placeholders for the reader's own code excepted)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [block for block in blocks if "..." not in block]
    assert len(runnable) >= 3
    namespace: dict = {}
    for block in runnable:  # one namespace, in order, as a reader pastes them
        exec(compile(block, str(README), "exec"), namespace)


def test_readme_reset_comment_shows_the_prompt_reset_gives():
    import gymnasium as gym

    import textenv  # noqa: F401  (registers TokenRLHF-v0)

    shown = re.search(r'env\.reset\(seed=0\)  # info\["prompt"\]: "(.*?)"', README.read_text())
    assert shown is not None
    _, info = gym.make("TokenRLHF-v0", device="cpu").reset(seed=0)
    assert info["prompt"] == shown.group(1)


def test_readme_calculator_table_agrees_with_its_evaluation_files():
    import json

    results = README.parent / "docs" / "results" / "calculator"
    rows = re.findall(
        r"^\| (GRPO|PPO) \| (\d) \| ([\d.]+)% \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
        README.read_text(),
        re.M,
    )
    assert len(rows) == 6
    sft = json.loads((results / "sft.json").read_text())
    for algo, seed, before, after, calls_before, calls_after, kl in rows:
        run = json.loads((results / f"{algo.lower()}-{seed}.json").read_text())
        assert before == f"{100 * sft['accuracy']:.1f}" and after == f"{100 * run['accuracy']:.1f}"
        assert calls_before == f"{sft['replies']:.3f}" and calls_after == f"{run['replies']:.2f}"
        assert kl == f"{run['kl']:.2f}"
