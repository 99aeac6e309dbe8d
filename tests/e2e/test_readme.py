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
