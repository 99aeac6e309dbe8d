"""docs/adapters.md's "Before and after RL" table agrees with the summaries in docs/results/reasoning_gym/.

Each summary is what ``examples/reasoning_gym/run.py --summary`` wrote: the SFT policy's accuracy, each RL
run's accuracy after training, each step's wall time and its command. The table shows them rounded; this test
reads them back from the table and checks every figure, and that each summary's commands are the ones the
section names (the task, the SFT from scratch, GRPO and PPO from its policy for seeds 0, 1 and 2), with the run's
directory written as OUT and no absolute path.
"""

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "adapters.md"
RESULTS = ROOT / "docs" / "results" / "reasoning_gym"
ROW = re.compile(
    r"^\| `(\w+)` \| ([\d.]+)% \| ([\d.]+)%, ([\d.]+)%, ([\d.]+)% \| ([\d.]+)%, ([\d.]+)%, ([\d.]+)% "
    r"\| (\d+) s \| (\d+)-(\d+) s \|$",
    re.M,
)


def section() -> str:
    text = DOC.read_text()
    start = text.index("## Before and after RL")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def test_table_rows_are_the_summaries():
    rows = ROW.findall(section())
    summaries = sorted(path.stem for path in RESULTS.glob("*.json"))
    assert len(summaries) >= 2
    assert sorted(row[0] for row in rows) == summaries
    for task, sft, *rest in rows:
        grpo, ppo, (sft_seconds, rl_low, rl_high) = rest[:3], rest[3:6], rest[6:]
        summary = json.loads((RESULTS / f"{task}.json").read_text())
        assert summary["dataset"] == task
        assert sft == percent(summary["sft"]["accuracy"])
        assert grpo == [percent(run["accuracy"]) for run in summary["grpo"]]
        assert ppo == [percent(run["accuracy"]) for run in summary["ppo"]]
        assert [run["seed"] for run in summary["grpo"]] == [run["seed"] for run in summary["ppo"]] == [0, 1, 2]
        assert sft_seconds == f"{summary['sft']['seconds']:.0f}"
        rl_seconds = [run["seconds"] for algo in ("grpo", "ppo") for run in summary[algo]]
        assert (rl_low, rl_high) == (f"{min(rl_seconds):.0f}", f"{max(rl_seconds):.0f}")


def test_summaries_record_the_commands_the_section_describes():
    for path in RESULTS.glob("*.json"):
        summary = json.loads(path.read_text())
        commands = summary["commands"]
        task = summary["task"]
        assert task.startswith(f"reasoning_gym:{path.stem}?")
        assert "--model scratch --tokenizer-kind characters" in commands["sft"]
        for algo in ("grpo", "ppo"):
            for seed in (0, 1, 2):
                command = commands[f"{algo}-{seed}"]
                assert command.startswith("python -m agents --task ") and task in command
                assert f"--policy OUT/sft/final --algo {algo} --seed {seed} " in command
                evaluate = commands[f"evaluate_{algo}-{seed}"]
                policy = f"--reference-model OUT/sft/final --k {summary['k']} --policy OUT/{algo}-{seed}/final"
                assert policy in evaluate
        assert not any(part.startswith("/") for text in commands.values() for part in shlex.split(text))


TEXTARENA = ROOT / "docs" / "results" / "textarena" / "summary.json"
GAME_ROW = re.compile(r"^\| (SFT|GRPO|PPO) \| ([\d., ]+) \| ([\d., ]+) \| ([\d., ]+) \|$", re.M)


def test_the_textarena_table_is_its_summary():
    """docs/adapters.md's Guess The Number table: every figure is what examples/textarena/run.py wrote."""
    text = DOC.read_text()
    start = text.index("### Before and after RL: Guess The Number")
    rows = {name: cells for name, *cells in GAME_ROW.findall(text[start : text.index("\n## ", start)])}
    summary = json.loads(TEXTARENA.read_text())
    assert set(rows) == {"SFT", "GRPO", "PPO"}
    for name, runs in [("SFT", [summary["sft"]]), ("GRPO", summary["grpo"]), ("PPO", summary["ppo"])]:
        reward, hints, kl = rows[name]
        assert reward == ", ".join(f"{run['reward']:.3f}" for run in runs)
        assert hints == ", ".join(f"{run['replies']:.2f}" for run in runs)
        assert kl == ", ".join(f"{round(run['kl'], 2) + 0.0:.2f}" for run in runs)
    assert [run["seed"] for run in summary["grpo"]] == [run["seed"] for run in summary["ppo"]] == [0, 1, 2]
    assert not re.search(r"(^|\s)/", " ".join(summary["commands"].values()))  # no absolute path: OUT/...
    prose = " ".join(text[start:].split())
    rl = [run["seconds"] for run in summary["grpo"] + summary["ppo"]]
    assert f"--steps 400` ({summary['sft']['seconds']:.0f} s)" in prose
    assert f"(640 games, {min(rl):.0f}-{max(rl):.0f} s)" in prose
    assert f"runs the steps ({sum(summary['seconds'].values()) / 60:.0f} minutes in all)" in prose
    ppo, grpo = ([run["reward"] for run in summary[algo]] for algo in ("ppo", "grpo"))
    assert (
        f"PPO ends above the SFT policy on all three seeds ({min(ppo):.3f}-{max(ppo):.3f} against "
        f"{summary['sft']['reward']:.3f}) and GRPO on one of three ({min(grpo):.3f}-{max(grpo):.3f}), by at most "
        f"{max(ppo + grpo) - summary['sft']['reward']:.3f}"
    ) in prose
    assert min(ppo) > summary["sft"]["reward"] and sum(g > summary["sft"]["reward"] for g in grpo) == 1
