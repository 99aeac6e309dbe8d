"""Fixtures of the end-to-end tests."""

import pytest


@pytest.fixture(scope="session")
def examples_out(tmp_path_factory):
    """One output directory for every example run, so the warm agent they share is trained once."""
    return tmp_path_factory.mktemp("examples")
