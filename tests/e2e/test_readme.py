"""The README's Python blocks run as written (those with ``...`` placeholders for the reader's own code excepted)."""

import re
from pathlib import Path

import pytest

from tests.e2e import readme_tables

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


def test_readme_pipeline_sentence_agrees_with_its_summary():
    import json

    summary = json.loads((README.parent / "docs" / "results" / "pipeline" / "summary.json").read_text())
    before, after = summary["evaluation"]["sft"], summary["evaluation"]["ppo"]
    sentence = (
        f"({before['response_length']:.1f} -> {after['response_length']:.1f} tokens), at a KL of "
        f"{after['kl']:.2f} nats per reply"
    )
    assert sentence in " ".join(README.read_text().split()), sentence


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


def test_readme_value_prior_cost_agrees_with_its_benchmarks_json():
    import json

    report = json.loads((README.parent / "docs" / "results" / "ppo_iteration_value_prior.json").read_text())
    default = report["shapes"]["default"]
    new, old = default["sides"]["textenv shared"], default["sides"]["textenv shared @other"]
    own = new["phases"]["rollout other"] - old["phases"]["rollout other"]  # the prior's forward, in the rollout
    sentence = (
        f"iteration measures {new['x_trl_time']:.2f}x TRL's time, against {old['x_trl_time']:.2f}x for the code "
        f"before it in the same rounds (`docs/results/ppo_iteration_value_prior.json`: `--shapes default --critics "
        f"shared --other-checkout` at that commit, load about 1): the prior's own reward-model forward is {own:.2f} s "
        f"of {new['s_per_update']:.2f} s, and the rest is longer responses from an actor that learns faster "
        f"({new['response_length_last']:.1f} tokens after {default['updates']} updates against "
        f"{old['response_length_last']:.1f})"
    )
    assert sentence in " ".join(README.read_text().split()), sentence


def test_the_micro_batch_figures_agree_with_their_json():
    """benchmarks/README.md's micro-batch table and docs/departures.md's gains are docs/results/micro_batch.json's."""
    import json

    results = README.parent / "docs" / "results"
    micro = json.loads((results / "micro_batch.json").read_text())
    small, default = micro["gpt2-small"], micro["default"]
    assert small["sparse_equals_dense"] and default["sparse_equals_dense"]
    g, d = small["modes"], default["modes"]
    rows = [
        f"| GPT-2-small, 4 x 48 tokens | {small['repeats']} | {g['dense']['total_s']:.3f} s (fwd "
        f"{g['dense']['forward_s']:.3f}, bwd {g['dense']['backward_s']:.3f}) | {g['sparse']['total_s']:.3f} s "
        f"({g['sparse']['x_dense']:.3f}x; bwd {g['sparse']['backward_s']:.3f}) | {g['gelu_new']['total_s']:.3f} s "
        f"({g['gelu_new']['x_dense']:.3f}x) |",
        f"| default task, 16 x 32 tokens | {default['repeats']} | {d['dense']['total_s'] * 1000:.1f} ms | "
        f"{d['sparse']['total_s'] * 1000:.1f} ms ({d['sparse']['x_dense']:.3f}x) | "
        f"{d['gelu_new']['total_s'] * 1000:.1f} ms ({d['gelu_new']['x_dense']:.3f}x) |",
    ]
    benchmarks = (README.parent / "benchmarks" / "README.md").read_text()
    for row in rows:
        assert row in benchmarks, row
    sides = json.loads((results / "ppo_iteration_tied_gradient.json").read_text())["shapes"]["gpt2-small"]["sides"]
    new, old = sides["textenv shared"], sides["textenv shared @other"]
    assert (new["score_last"], new["kl_last"]) == (old["score_last"], old["kl_last"])  # the same training
    sentence = (
        f"a GPT-2-small iteration's backwards take {new['phases']['backwards']:.2f} s against "
        f"{old['phases']['backwards']:.2f} s and the run's peak RSS is {new['peak_rss_mb']:,.0f} MB against "
        f"{old['peak_rss_mb']:,.0f} MB"
    )
    assert sentence in " ".join(benchmarks.split()), sentence
    departures = " ".join((README.parent / "docs" / "departures.md").read_text().split())
    for sentence in (
        f"one micro-batch's forward and backward {g['dense']['total_s']:.3f} -> {g['sparse']['total_s']:.3f} s "
        f"({100 * (1 - g['sparse']['x_dense']):.0f}% less",
        f"peak RSS {old['peak_rss_mb']:,.0f} -> {new['peak_rss_mb']:,.0f} MB",
        f"{d['dense']['total_s'] * 1000:.1f} -> {d['sparse']['total_s'] * 1000:.1f} ms",
        f"default task {d['gelu_new']['total_s'] * 1000:.1f} -> {d['dense']['total_s'] * 1000:.1f} ms",
        f"GPT-2-small shape {g['gelu_new']['total_s']:.3f} -> {g['dense']['total_s']:.3f} s",
    ):
        assert sentence in departures, sentence


def vocabulary_block_sentences() -> dict[str, list[str]]:
    """What README.md, docs/departures.md and benchmarks/README.md say of the LM head's vocabulary blocks, from
    docs/results/vocabulary_blocks.json and docs/results/ppo_iteration_head_blocks.json."""
    import json

    results = README.parent / "docs" / "results"
    blocks = json.loads((results / "vocabulary_blocks.json").read_text())
    assert all(row["same_floats"] for row in blocks["rows"] if row["product"] == "logits")
    logits = {row["tokens"]: row for row in blocks["rows"] if row["product"] == "logits"}
    sides = json.loads((results / "ppo_iteration_head_blocks.json").read_text())["shapes"]["gpt2-small"]["sides"]
    shared, shared_old = sides["textenv shared"], sides["textenv shared @other"]
    separate, separate_old = sides["textenv separate"], sides["textenv separate @other"]
    for new, old in ((shared, shared_old), (separate, separate_old)):  # the same training, to the digit
        assert (new["score_last"], new["kl_last"]) == (old["score_last"], old["kl_last"])
    rounds = json.loads((results / "ppo_iteration_head_blocks_shared.json").read_text())
    settings, rounds = rounds["settings"], rounds["shapes"]["gpt2-small"]["sides"]
    longer, longer_old = rounds["textenv shared"], rounds["textenv shared @other"]
    assert (longer["score_last"], longer["kl_last"]) == (longer_old["score_last"], longer_old["kl_last"])
    longer_run = (
        f"{settings['gpt2_rounds']} rounds of {settings['gpt2_updates']} updates, shared critic only: "
        f"{longer_old['s_per_update']:.1f} -> {longer['s_per_update']:.1f} s"
    )

    def moved(name: str) -> str:
        return f"{longer_old['phases'][name]:.2f} -> {longer['phases'][name]:.2f}"

    gains = (
        f"GPT-2-small's head, one torch thread: the logits of 128 tokens {logits[128]['torch_gflops']:.0f} -> "
        f"{logits[128]['blocked_gflops']:.0f} GFLOP/s, of a 16-row rollout step {logits[16]['torch_gflops']:.0f} -> "
        f"{logits[16]['blocked_gflops']:.0f} GFLOP/s"
    )
    iteration = (
        f"a GPT-2-small PPO iteration {shared_old['s_per_update']:.1f} -> {shared['s_per_update']:.1f} s with the "
        f"shared critic and {separate_old['s_per_update']:.1f} -> {separate['s_per_update']:.1f} s with a separate one"
    )
    table = [
        f"| {row['tokens']} | {row['torch_gflops']:.1f} | {row['blocked_gflops']:.1f} | {row['speedup']:.2f}x |"
        for row in logits.values()
    ]
    backward = {(row["tokens"], row["product"]): row["torch_gflops"] for row in blocks["rows"]}
    readme = (
        f"at GPT-2-small shape textenv now takes {shared['x_trl_time']:.2f}x TRL's time and "
        f"{shared['x_trl_rss']:.2f}x its peak memory with the shared critic, {separate['x_trl_time']:.2f}x and "
        f"{separate['x_trl_rss']:.2f}x with a separate one"
    )
    return {
        "departures": [gains, iteration, longer_run],
        "benchmarks": [
            longer_run,
            f"the rollout's policy and reference steps {moved('policy')} and {moved('reference')} s, the update's "
            f"forwards and re-score {moved('forwards')} and {moved('re-score')} s",
            *table,
            iteration,
            f"the hidden states' gradient runs at {backward[(128, 'input grad')]:.0f} GFLOP/s, near the trunk's rate, "
            f"and the weight's at {backward[(128, 'weight grad')]:.0f} GFLOP/s,",
        ],
        "readme": [readme],
    }


def test_the_vocabulary_block_figures_agree_with_their_jsons():
    sentences = vocabulary_block_sentences()
    texts = {
        "departures": README.parent / "docs" / "departures.md",
        "benchmarks": README.parent / "benchmarks" / "README.md",
        "readme": README,
    }
    for where, path in texts.items():
        text = " ".join(path.read_text().split())
        for sentence in sentences[where]:
            assert " ".join(sentence.split()) in text, (where, sentence)


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


@pytest.mark.parametrize("table", readme_tables.tables(), ids=lambda table: table.name)
def test_readme_table_reads_as_its_results_say(table):
    """Each README table of measured figures is what the JSON its runs wrote says (``python -m
    tests.e2e.readme_tables`` rewrites them)."""
    lines = README.read_text().split("\n")
    rows = readme_tables.rewritten(lines, table)
    wrong = [f"{lines[i]}\n  should read\n{line}" for i, line in rows if lines[i] != line]
    assert not wrong, "\n".join(wrong)


def test_the_table_writer_puts_back_a_figure_that_moved(tmp_path):
    readme = tmp_path / "README.md"
    text = README.read_text()
    row = next(line for line in text.split("\n") if line.startswith("| PPO | 1 |"))  # the calculator's
    moved = row[: row.rindex("|", 0, len(row) - 1)] + "| 9.99 |"  # its last figure, the KL, changed
    readme.write_text(text.replace(row, moved, 1))
    assert readme.read_text() != text
    assert readme_tables.write(readme) == 1
    assert readme.read_text() == text


def test_readme_arithmetic_sentence_agrees_with_the_recipes_runs():
    import json

    runs = json.loads((README.parent / "docs" / "results" / "recipes" / "arithmetic.json").read_text())["runs"]
    earlier = " / ".join(f"{100 * run['accuracy']:.1f}" for run in runs["ppo (earlier critic)"])
    assert f"fixed reaches {earlier}% here" in " ".join(README.read_text().split()), earlier
