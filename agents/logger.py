"""What a training run writes beside its checkpoints: metrics (JSONL, CSV, TensorBoard), samples, a plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import threading
from pathlib import Path

from matplotlib.figure import Figure  # drawn straight to a file: no pyplot, no backend to choose
from torch.utils.tensorboard import SummaryWriter

CURVES = (
    ("env/score", "eval/score", "score (reward model)"),
    ("env/kl", None, "KL to reference (nats per response)"),
    ("loss/value", None, "value loss"),
    ("policy/entropy", None, "entropy (nats per token)"),
)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a kill at any moment leaves the old file or the new, never half."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="") as f:
        f.write(text)
    os.replace(partial, path)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a last line cut off by a killed process is dropped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only a write interrupted mid-line can leave one
    return rows


class RunLogger:
    """Appends one row of metrics per iteration; after a resume, drops rows the checkpoint does not cover."""

    def __init__(self, run_dir: Path, start_iteration: int, curves=CURVES):
        self.run_dir = Path(run_dir)
        self.curves = curves  # (train key, eval key or None, title) per panel of learning_curve.png
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.rows: list[dict] = []
        if self.jsonl.exists():
            rows = read_jsonl(self.jsonl)
            self.rows = [row for row in rows if row["iteration"] < start_iteration]
        self._rewrite(self.jsonl, self.rows)
        samples = self.run_dir / "samples.jsonl"
        if samples.exists():
            kept = read_jsonl(samples)
            self._rewrite(samples, [s for s in kept if s["iteration"] < start_iteration])
        self.tensorboard = SummaryWriter(self.run_dir / "tensorboard", purge_step=start_iteration)
        self._drawing: threading.Thread | None = None

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))

    def log(self, iteration: int, metrics: dict[str, float], samples: list[dict]) -> None:
        row = {"iteration": iteration, **metrics}
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for sample in samples:
                f.write(json.dumps({"iteration": iteration, **sample}) + "\n")
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, value, iteration)
        self.tensorboard.flush()
        self.write_csv()

    def write_csv(self) -> None:
        keys = ["iteration"] + sorted({k for row in self.rows for k in row} - {"iteration"})
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomically(self.run_dir / "metrics.csv", text.getvalue())

    def plot(self, wait: bool = True) -> Path:
        """The curves (by default score, KL, value loss and entropy) over iterations, as ``learning_curve.png``.

        ``wait=False`` draws on a background thread (a drawing took 0.4 s, a third of an
        iteration of the default task) from a copy of the rows; a request while one is
        drawing is dropped, since the next plot draws every row anyway. The file is
        replaced in one step, so a kill mid-drawing leaves the previous one.
        """
        path = self.run_dir / "learning_curve.png"
        if self._drawing is not None:
            if not wait and self._drawing.is_alive():
                return path
            self._drawing.join()
        rows = list(self.rows)
        if wait:
            draw_curves(rows, path, self.curves)
        else:
            self._drawing = threading.Thread(
                target=draw_curves, args=(rows, path, self.curves), name="learning-curve", daemon=True
            )
            self._drawing.start()
        return path

    def close(self) -> None:
        if self._drawing is not None:
            self._drawing.join()
        self.tensorboard.close()


def draw_curves(rows: list[dict], path: Path, curves=CURVES) -> None:
    """The learning curves of ``rows`` (one dict per logged iteration) to the PNG ``path``, replaced in one step:
    one panel per ``(train key, eval key or None, title)`` of ``curves``, two to a row."""
    n_rows = (len(curves) + 1) // 2
    fig = Figure(figsize=(10, 3.5 * n_rows))
    axes = fig.subplots(n_rows, 2, sharex=True, squeeze=False)
    for ax, (key, eval_key, title) in zip(axes.flat, curves):
        for name, label in ((key, "train rollouts"), (eval_key, "eval prompts")):
            points = [(r["iteration"], r[name]) for r in rows if name and not math.isnan(r.get(name, math.nan))]
            if points:
                ax.plot(*zip(*points), marker="." if name == eval_key else None, label=label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if eval_key:
            ax.legend()
    for ax in axes[-1]:
        ax.set_xlabel("iteration")
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, dpi=100, format="png")
    os.replace(partial, path)


def summary(run_dir: Path) -> str:
    """First and last evaluation of a run, as text."""
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    evals = [r for r in rows if "eval/score" in r]
    if not evals:
        return "no evaluation yet"
    first, last = evals[0], evals[-1]
    lines = [f"{'':22}{'iteration ' + str(first['iteration']):>16}{'iteration ' + str(last['iteration']):>16}"]
    rate = "eval/positive_rate" if "eval/positive_rate" in last else "eval/score_gt0_rate"  # reviews, or neutral
    for key in (rate, "eval/score", "eval/kl", "eval/response_length", "eval/eos_rate"):
        lines.append(f"{key:22}{first[key]:>16.3f}{last[key]:>16.3f}")
    seconds = sum(r.get("perf/iteration_s", 0.0) for r in rows)
    lines.append(f"{'time (s)':22}{'':>16}{seconds:>16.1f}")
    return "\n".join(lines)
