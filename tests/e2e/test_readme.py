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


def test_readme_pipeline_table_agrees_with_its_summary():
    import json

    summary = json.loads((README.parent / "docs" / "results" / "pipeline" / "summary.json").read_text())
    text = README.read_text()
    sft, rm, evaluation = summary["sft"], summary["reward_model"], summary["evaluation"]
    rows = [
        f"| 1. SFT, from scratch | held-out loss per response token | {sft['eval_loss_before']:.2f} | "
        f"{sft['eval_loss_after']:.3f} | {sft['seconds']:.0f} s |",
        f"| 2. reward model, from the SFT policy | held-out pairwise accuracy | {rm['accuracy_before']:.3f} | "
        f"{rm['accuracy_after']:.3f} | {rm['seconds']:.0f} s |",
        f"| 3. PPO, 60 iterations | eval score (calibrated reward model) | {evaluation['sft']['score']:.3f} | "
        f"{evaluation['ppo']['score']:.3f} | {summary['ppo']['seconds']:.0f} s |",
        f"| evaluation, 16 held-out complaints x 8 | share of replies scored above 0 | "
        f"{100 * evaluation['sft']['score_gt0_rate']:.1f}% | {100 * evaluation['ppo']['score_gt0_rate']:.1f}% | "
        f"{evaluation['seconds']:.0f} s |",
    ]
    for row in rows:
        assert row in text, row
    before, after = evaluation["sft"], evaluation["ppo"]
    sentence = (
        f"({before['response_length']:.1f} -> {after['response_length']:.1f} tokens), at a KL of "
        f"{after['kl']:.2f} nats per reply"
    )
    assert sentence in " ".join(text.split()), sentence


def test_readme_rebuild_figures_agree_with_the_reports():
    import json

    rebuilt = json.loads((README.parent / "docs" / "results" / "rebuild" / "arithmetic.json").read_text())["report"]
    shipped = json.loads((README.parent / "textenv" / "arithmetic" / "artifacts" / "task.json").read_text())["report"]
    greedy, sampled = (100 * rebuilt[f"accuracy/{kind}"] for kind in ("greedy", "sampled"))
    sentence = (
        f"gave greedy accuracy {greedy:.1f}% and sampled {sampled:.1f}%, "
        f"against the shipped {100 * shipped['accuracy/greedy']:.1f}% and {100 * shipped['accuracy/sampled']:.1f}%"
    )
    assert sentence in " ".join(README.read_text().split()), sentence


def test_readme_trl_comparison_agrees_with_the_benchmarks_json():
    import json

    figures = json.loads((README.parent / "docs" / "results" / "ppo_iteration.json").read_text())["shapes"]
    small, default = figures["gpt2-small"]["sides"], figures["default"]["sides"]
    sentence = (
        f"textenv takes {default['textenv shared']['x_trl_time']:.2f}x TRL's time with the shared critic and "
        f"{default['textenv separate']['x_trl_time']:.2f}x with a separate one, at "
        f"{default['textenv shared']['x_trl_rss']:.2f}x its peak memory; at GPT-2-small shape (16 x 32) "
        f"{small['textenv shared']['x_trl_time']:.2f}x its time and {small['textenv shared']['x_trl_rss']:.2f}x its "
        f"memory ({small['textenv separate']['x_trl_time']:.2f}x and {small['textenv separate']['x_trl_rss']:.2f}x "
        "with a separate critic, which trains the same two trunks TRL trains), and in bf16 at that shape "
        f"{small['textenv shared bf16']['x_trl_time']:.2f}x its time and "
        f"{small['textenv shared bf16']['x_trl_rss']:.2f}x its memory, TRL also in bf16"
    )
    assert sentence in " ".join(README.read_text().split()), sentence


def test_scaling_doc_quotes_the_benchmarks_json():
    import json

    small = json.loads((README.parent / "docs" / "results" / "ppo_iteration.json").read_text())["shapes"]
    small = small["gpt2-small"]["sides"]
    text = " ".join((README.parent / "docs" / "scaling.md").read_text().split())
    sentence = (
        f"textenv's bf16 iteration took {small['textenv shared bf16']['s_per_update']:.1f} s against TRL's "
        f"{small['trl bf16']['s_per_update']:.1f} s in bf16 ({small['textenv shared bf16']['x_trl_time']:.2f}x; fp32 "
        f"{small['textenv shared']['s_per_update']:.1f} s against {small['trl']['s_per_update']:.1f} s, "
        f"{small['textenv shared']['x_trl_time']:.2f}x)"
    )
    assert sentence in text, sentence


def percent(rate: float) -> str:
    """A rate as the README prints it: 100% whole, else to a tenth of a percent."""
    return "100%" if rate == 1 else f"{100 * rate:.1f}%"


def test_readme_default_task_tables_agree_with_their_runs():
    import json

    results = json.loads((README.parent / "docs" / "results" / "default_task.json").read_text())
    text = README.read_text()
    for seed, run in results["defaults"].items():
        before, after = run["before"], run["after"]
        cells = [seed, percent(before["eval/positive_rate"]), percent(after["eval/positive_rate"])]
        cells += [f"{before['eval/score']:.2f}", f"{after['eval/score']:.2f}", f"{after['eval/kl']:.1f}"]
        row = "| " + " | ".join(cells) + " |"
        assert row in text, row
    for name, run in results["token budget"].items():
        after = run["after"]
        cells = [str(run["iterations"]), percent(after["eval/positive_rate"]), f"{after['eval/score']:.2f}"]
        cells += [f"{after['eval/kl']:.1f}", f"{run['training_seconds']:.0f} s"]
        row = re.compile(rf"^\| {re.escape(name)}[^|]* \| " + re.escape(" | ".join(cells)) + r" \|$", re.M)
        assert row.search(text), (name, cells)


def test_readme_arithmetic_table_agrees_with_the_recipes_runs():
    import json

    results = README.parent / "docs" / "results"
    runs = json.loads((results / "recipes" / "arithmetic.json").read_text())["runs"]
    sft = json.loads((results / "evaluate" / "arithmetic-sft.json").read_text())
    text = README.read_text()
    for algo in ("GRPO", "PPO"):
        for run in runs[f"{algo.lower()} (default)"]:
            cells = [algo, str(run["seed"]), f"{100 * sft['accuracy']:.1f}%", f"{100 * run['accuracy']:.1f}%"]
            cells += [f"{100 * sft['pass@4']:.1f}%", f"{100 * run['pass@4']:.1f}%", f"{run['kl']:.2f}"]
            row = "| " + " | ".join(cells) + " |"
            assert row in text, row
    earlier = " / ".join(f"{100 * run['accuracy']:.1f}" for run in runs["ppo (earlier critic)"])
    assert f"fixed reaches {earlier}% here" in " ".join(text.split()), earlier


EVALUATIONS = ("reviews-sft", "reviews-ppo", "arithmetic-sft", "arithmetic-ppo")


def evaluation_rows(results: dict[str, dict]) -> list[str]:
    """The README's table of `python -m agents.evaluate` figures, one column per JSON in docs/results/evaluate/."""

    def signed(x: float) -> str:
        return f"{x:+.2f}"

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(results[name]) for name in EVALUATIONS) + " |"

    def exact(d: dict, key: str) -> str:
        return percent(d[key]) if key in d else "-"

    return [
        row("mean score", lambda d: signed(d["score"])),
        row("score std", lambda d: f"{d['score_std']:.2f}"),
        row("score 10% / 50% / 90%", lambda d: " / ".join(signed(d[f"score_q{q}"]) for q in (10, 50, 90))),
        row(
            "score > 0 rate (`positive_rate` / `score_gt0_rate`)",
            lambda d: percent(d.get("positive_rate", d.get("score_gt0_rate"))),
        ),
        row("accuracy (exact match)", lambda d: exact(d, "accuracy")),
        row("pass@4", lambda d: exact(d, "pass@4")),
        row(
            "KL to the reference (nats per response)",
            lambda d: f"{abs(d['kl']) if abs(d['kl']) < 5e-3 else d['kl']:.2f}",  # a model's KL to itself: 0.00
        ),
        row("response length (tokens)", lambda d: f"{d['response_length']:.2f}"),
        row("EOS rate", lambda d: percent(d["eos_rate"])),
        row("episodes (prompts x 4)", lambda d: f"{d['episodes']:.0f}"),
    ]


def test_readme_evaluation_table_agrees_with_its_evaluation_files():
    import json

    folder = README.parent / "docs" / "results" / "evaluate"
    results = {name: json.loads((folder / f"{name}.json").read_text()) for name in EVALUATIONS}
    text = README.read_text()
    for row in evaluation_rows(results):
        assert row in text, row
