"""agents/logger.py: what a run writes beside its checkpoints: the plot drawn off the training thread, and the
metrics rewritten atomically on resume."""

import json

import pytest

from agents.logger import RunLogger, write_atomically


def test_background_plot_writes_the_curve_and_close_waits_for_it(tmp_path):
    logger = RunLogger(tmp_path, start_iteration=0)
    for iteration in range(3):
        metrics = {"env/score": float(iteration), "env/kl": 0.1, "loss/value": 1.0, "policy/entropy": 2.0}
        logger.log(iteration, metrics, [])
        logger.plot(wait=False)
    logger.close()
    png = (tmp_path / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and not list(tmp_path.glob(".*.partial"))


def test_an_interrupted_rewrite_of_the_metrics_keeps_the_old_file(tmp_path, monkeypatch):
    history = "".join(json.dumps({"iteration": i, "env/score": float(i)}) + "\n" for i in range(2000))
    (tmp_path / "metrics.jsonl").write_text(history)

    def killed(path, text):  # the process dies halfway through writing the new file
        with open(path.with_name(f".{path.name}.partial"), "w") as f:
            f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr("agents.logger.write_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        RunLogger(tmp_path, start_iteration=1500)
    assert (tmp_path / "metrics.jsonl").read_text() == history

    monkeypatch.undo()
    logger = RunLogger(tmp_path, start_iteration=1500)  # the resume that follows keeps what the checkpoint covers
    logger.close()
    assert [r["iteration"] for r in logger.rows] == list(range(1500))


def test_write_atomically_replaces_the_whole_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n" * 100)
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert list(tmp_path.iterdir()) == [path]
