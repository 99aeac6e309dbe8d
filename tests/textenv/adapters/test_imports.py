"""The extras stay optional: importing textenv, its adapter modules and building a reasoning-gym task's config
never imports reasoning_gym, textarena or openenv (each adapter imports its library when it is used)."""

import subprocess
import sys

import pytest

LIBRARIES = ("reasoning_gym", "textarena", "openenv")
CODE = """
import sys
import textenv, textenv.adapters, textenv.adapters.episodes
import textenv.adapters.reasoning_gym, textenv.adapters.textarena, textenv.adapters.openenv
from textenv import TokenEnvConfig
TokenEnvConfig(task="reasoning_gym:chain_sum?size=10&max_terms=2")
print(sorted(name for name in {libraries!r} if name in sys.modules))
"""


def test_importing_textenv_and_the_adapters_imports_no_extra():
    result = subprocess.run(
        [sys.executable, "-c", CODE.format(libraries=LIBRARIES)], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize(("module", "library"), [("reasoning_gym", "reasoning_gym"), ("textarena", "textarena")])
def test_using_an_adapter_imports_its_library(module, library):
    """The check above could not pass by accident: using an adapter does import its library."""
    pytest.importorskip(library)
    use = {
        "reasoning_gym": "textenv.adapters.reasoning_gym.task('reasoning_gym:chain_sum?size=2')",
        "textarena": "textenv.adapters.textarena.TextArenaGame('GuessTheNumber-v0').rows([0])",
    }[module]
    code = f"import sys, textenv.adapters.{module}\n{use}\nprint({library!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
