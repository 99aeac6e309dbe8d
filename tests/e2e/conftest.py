"""Fixtures of the end-to-end tests."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def examples_out(tmp_path_factory):
    """One output directory for every example run, so the warm agent they share is trained once."""
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="session")
def walkthrough_out(tmp_path_factory):
    """Every example run once with its default settings, by examples/walkthrough.py in this process.

    The numbers the docs quote (tests/e2e/test_doc_numbers.py) and the exercises' answers
    (tests/e2e/test_exercises.py) are those of default runs, so both read this one
    directory; ``examples_out`` holds the fast tier's small runs, whose numbers differ.
    """
    out = tmp_path_factory.mktemp("walkthrough")
    walkthrough = ROOT / "examples" / "walkthrough.py"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [str(walkthrough), "--out", str(out)])
        patch.syspath_prepend(str(ROOT / "examples"))  # restores sys.path, which the walkthrough extends
        runpy.run_path(str(walkthrough), run_name="__main__")
    return out
