"""What the multi-step example scripts share (``pipeline/run.py``, ``reasoning_gym/run.py``, ``textarena/run.py``):
each step run as its own command and timed, its command line recorded without this machine's paths, the
library's source digest kept the same across the steps, and the summary written as JSON.

A script in a folder of ``examples/`` imports it after putting ``examples/`` on ``sys.path``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_digest() -> str:
    """SHA-256 of the library's Python sources (agents/ and textenv/): the same at the start and the end of a run
    says every step ran the same code."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("agents/**/*.py"), *ROOT.glob("textenv/**/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def relative(command: list[str], out: Path) -> str:
    """The command as text, the output directory written as OUT and paths in the checkout relative to its root (a
    summary names no machine's paths)."""
    return "python -m " + shlex.join(command).replace(str(out), "OUT").replace(f"{ROOT}/", "")


def run_steps(commands: dict[str, list[str]], out: Path, cwd: Path | None = None) -> tuple[dict, dict, str]:
    """Run each step (``python -m`` and its arguments) in order, in ``cwd``: each step's seconds and command text,
    and the library's source digest. Exits if the sources change while the steps run (they may then have run
    different code)."""
    digest, seconds, texts = source_digest(), {}, {}
    for name, command in commands.items():
        print("$ python -m " + shlex.join(command), flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", *command], check=True, cwd=cwd)
        seconds[name], texts[name] = time.perf_counter() - start, relative(command, out)
    if source_digest() != digest:
        sys.exit("the library's sources changed during the run: its steps may have run different code; run it again")
    return seconds, texts, digest


def write_summary(result: dict, out: Path, summary: Path | None) -> None:
    """``result``, with the machine's CPU count and load, as JSON in OUT/summary.json, and in ``summary`` too when
    given; printed."""
    result = result | {"cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]}
    text = json.dumps(result, indent=2) + "\n"
    (out / "summary.json").write_text(text)
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(text)
    print(text)
