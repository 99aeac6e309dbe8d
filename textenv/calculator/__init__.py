"""The embedded calculator task: the arithmetic problems, with a tool the agent may call (more turns help).

The problems are the arithmetic task's (``load_rows`` is ``textenv.arithmetic.load_rows``):
a prompt ``17+25=``, the answer ``42``, one token per character. The agent may
answer directly, in one turn, or call the calculator first, in two::

    17+25=42<eos>                 direct: the agent writes the answer
    17+25=?<eos>42:42<eos>        tool: the agent calls (``?<eos>``), the calculator
                                  appends the result and a separator (``42:``), the
                                  agent answers (``42<eos>``)

EOS ends a turn and ``Calculator.respond`` decides what follows: the call ``?``
gets the result, anything else ends the episode. ``final_answer`` pays 1.0 when
the answer after the last separator (or the whole response, without a call) is
right. The SFT policy ships with the package and loads offline::

    from transformers import AutoModelForCausalLM
    from textenv.calculator import POLICY_DIR, Calculator, final_answer, load_rows
    policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    rows = load_rows("train")  # [{"prompt": "17+25=", "answer": "42"}, ...]

It was trained on transcripts of which 25% call the calculator and copy its
result, and 75% answer directly with the arithmetic task's noisy answers (60% off
by one or by ten). So it calls the tool on about a quarter of the prompts, copies
the result when it does, and otherwise often answers wrong: an RL learner gains
by calling the tool every time. ``python -m textenv.calculator report`` (1000
episodes at temperature 1 over the 200 held-out prompts, seed 0, the calculator
answering; the task's limits: at most 3 agent turns of 6 tokens) measures the shipped policy:

    episode/success     0.579    episode/success_greedy  0.970
    tool/call_rate      0.262    tool/copy_accuracy      0.985
    direct/accuracy     0.435    policy/eos_rate         1.000

Greedy decoding almost never calls (1 prompt in 200): the call's first-token
probability is 0.14 to 0.36, below the answer's first digit. In a check made
while choosing the build, a minimal GRPO loop over the report's episodes (32
train prompts x 8 episodes per update, one gradient step each on the agent's
tokens, lr 3e-4, no KL) raised the held-out sampled success to 0.925 and the call
rate to 0.91 after 30 updates (about 10 s on one CPU thread), and both to 0.99
after 150.

Rebuild it with ``python -m agents.build calculator --out DIR`` (about 2 minutes
on one thread).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from textenv.arithmetic import MAX_PROMPT_TOKENS as ARITHMETIC_MAX_PROMPT_TOKENS
from textenv.arithmetic import load_rows
from textenv.turns import Reply, Turn

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
POLICY_DIR = ARTIFACTS_DIR / "policy"

CALL = "?"
"""The agent's whole turn when it calls the calculator (then EOS)."""
SEPARATOR = ":"
"""Ends the calculator's reply, e.g. ``42:``; no answer contains it, so the answer is what follows the last one."""

# The task's episode limits: its preset (``textenv.tasks``) gives them to the env, the trainer and the evaluator.
MAX_PROMPT_TOKENS = ARITHMETIC_MAX_PROMPT_TOKENS
"""Prompt budget: the arithmetic task's; the longest prompt, ``99+99=``, is 6 tokens."""
MAX_TURNS = 3
"""Agent turns: a call and an answer take 2; the third leaves room for one stray turn."""
MAX_NEW_TOKENS = 6
"""Tokens per agent turn: the longest answer, ``198<eos>``, is 4 tokens."""
MAX_ENV_TOKENS = 6
"""Tokens per calculator reply: the longest, ``198:``, is 4 tokens."""

PROBLEM = re.compile(r"(\d+)\+(\d+)=")


def operands(prompt: str) -> tuple[int, int]:
    """(a, b) of the prompt ``a+b=``; any other prompt is an error."""
    match = PROBLEM.fullmatch(prompt)
    if match is None:
        raise ValueError(f"the calculator reads prompts 'a+b=' (a, b digits), got {prompt!r}")
    return int(match[1]), int(match[2])


def result_text(prompt: str) -> str:
    """What the calculator appends after a call: the sum of the prompt, then ``SEPARATOR`` (``17+25=`` -> ``42:``)."""
    a, b = operands(prompt)
    return f"{a + b}{SEPARATOR}"


@dataclass(frozen=True)
class Calculator:
    """The environment's side of the task (a ``textenv.turns.Interaction``): the call gets the sum, anything else ends.

    No turn reward: ``final_answer`` pays at the end. It keeps no state, so one
    instance serves every episode, and it pickles (vector envs in subprocesses).
    """

    def respond(self, turn: Turn) -> Reply:
        if turn.turn_text == CALL:
            return Reply(text=result_text(turn.prompt))
        return Reply(done=True)


def final_answer(prompt: str, response: str, response_ids: list[int], row: dict) -> float:
    """1.0 when the agent's answer is ``row["answer"]``; else 0.0.

    ``response`` is everything after the prompt decoded, special tokens skipped:
    the agent's turns and the calculator's replies, e.g. ``?42:42`` or ``42``. The
    answer is the text after the last ``SEPARATOR`` (the whole response when there
    is none), stripped; it is always text the agent wrote, never the calculator's
    result itself (``?42:`` followed by an empty turn answers ``""``). ``prompt`` and
    ``response_ids`` are unused, as in ``textenv.arithmetic.exact_match``.
    """
    return float(response.rpartition(SEPARATOR)[2].strip() == row["answer"])


__all__ = [
    "ARTIFACTS_DIR",
    "CALL",
    "MAX_ENV_TOKENS",
    "MAX_NEW_TOKENS",
    "MAX_PROMPT_TOKENS",
    "MAX_TURNS",
    "POLICY_DIR",
    "SEPARATOR",
    "Calculator",
    "final_answer",
    "load_rows",
    "operands",
    "result_text",
]
