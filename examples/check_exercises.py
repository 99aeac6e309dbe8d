"""Check your implementations of the exercises against the library's, on random batches.

docs/exercises.md, "Implement it yourself", asks for three functions, each in its own
file under examples/exercises/ (stubs that raise NotImplementedError until you write them):

    my_gae.py          compute_gae(rewards, values, next_values, terminated, mask, gamma, lam)
                       -> (advantages, returns)                        vs agents.advantages.compute_gae
    my_policy_loss.py  policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
                       -> loss (its value and its gradient)            vs agents.losses.policy_loss
    my_kl_penalty.py   non_score_reward(ref_logprobs, logprobs, kl_coef)
                       -> (reward, kl)                                 vs textenv.rewards.non_score_reward

Each is called on a few dozen random batches (episodes of random lengths, terminated or
truncated, ratios that do and do not clip); the first mismatch is printed with the batch
it came from. Exit status 0 when every exercise checked passes.

Run:  python examples/check_exercises.py [--only gae|policy_loss|kl_penalty] [--solutions DIR] [--cases N]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from agents.advantages import compute_gae
from agents.losses import policy_loss
from textenv.rewards import non_score_reward

HERE = Path(__file__).resolve().parent
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


class Mismatch(Exception):
    """The reader's function disagrees with the library's: the message says where."""


def load(directory: Path, file: str, name: str) -> Callable:
    """The function ``name`` of ``directory/file``, imported as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"exercise_{Path(file).stem}", directory / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def compare(what: str, yours, expected: torch.Tensor, context: Callable[[tuple[int, ...]], str]) -> None:
    """Raise Mismatch at the first entry (row-major) where ``yours`` differs from ``expected``."""
    if not isinstance(yours, torch.Tensor):
        raise Mismatch(f"{what}: expected a tensor, got {type(yours).__name__}")
    if yours.shape != expected.shape:
        raise Mismatch(f"{what}: shape {tuple(yours.shape)}, the library's is {tuple(expected.shape)}")
    bad = ~torch.isclose(yours.detach().double(), expected.detach().double(), **TOLERANCE)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        entry = f"{what}[{', '.join(map(str, index))}]" if index else what
        raise Mismatch(f"{entry}: yours {float(yours[index]):+.6f}, the library's {float(expected[index]):+.6f}"
                       f"{context(index)}")  # fmt: skip


def episodes(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, terminated) of a random right-padded batch: a prefix of each row is its episode; a row shorter than
    the batch ends with EOS (terminated), a full-length row may be terminated or truncated."""
    batch, width = (int(torch.randint(low, high, (1,), generator=generator)) for low, high in ((1, 7), (1, 10)))
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    lengths[0] = width  # at least one full-length row
    mask = torch.arange(width)[None, :] < lengths[:, None]
    full = lengths == width
    eos = ~full | (torch.rand(batch, generator=generator) < 0.5)
    terminated = torch.zeros(batch, width, dtype=torch.bool)
    terminated[torch.arange(batch), lengths - 1] = eos
    return mask, terminated


def rows(mask: torch.Tensor, terminated: torch.Tensor | None, **tensors: torch.Tensor) -> Callable[..., str]:
    """What to print about the row of a mismatch: its length, how it ended (if it matters), and the inputs."""

    def describe(index: tuple[int, ...]) -> str:
        if not index:
            return ""
        b = index[0]
        n = int(mask[b].sum())
        ended = "" if terminated is None else ", the episode is " + (
            "terminated (EOS)" if bool(terminated[b, n - 1]) else "truncated")  # fmt: skip
        lines = [f"\n    row {b}: {n} of {mask.shape[1]} columns are steps{ended}"]
        lines += [f"\n    {key} of row {b}: {[round(float(v), 4) for v in value[b]]}" for key, value in tensors.items()]
        return "".join(lines)

    return describe


def check_gae(function: Callable, generator: torch.Generator) -> str:
    gamma = [1.0, 0.99, 0.9][int(torch.randint(0, 3, (1,), generator=generator))]
    lam = [0.95, 1.0, 0.0, 0.5][int(torch.randint(0, 4, (1,), generator=generator))]
    mask, terminated = episodes(generator)
    shape = mask.shape
    rewards = torch.randn(shape, generator=generator) * mask  # 0 after the end, as the env's
    values = torch.randn(shape, generator=generator)  # anything on the padding: it must not leak
    next_values = torch.cat([values[:, 1:], torch.randn(shape[0], 1, generator=generator)], 1)  # V(s_{t+1})
    expected = compute_gae(rewards, values, next_values, terminated, mask, gamma, lam)
    yours = function(rewards.clone(), values.clone(), next_values.clone(), terminated.clone(), mask.clone(), gamma,
                     lam)  # fmt: skip
    if not (isinstance(yours, tuple) and len(yours) == 2):
        raise Mismatch(f"expected (advantages, returns), got {type(yours).__name__}")
    context = rows(mask, terminated, rewards=rewards, values=values, next_values=next_values)
    for what, mine, reference in zip(("advantages", "returns"), yours, expected):
        compare(what, mine, reference, context)
    return f"B={shape[0]}, T={shape[1]}, gamma={gamma}, lam={lam}"


def check_policy_loss(function: Callable, generator: torch.Generator) -> str:
    clip_range = [0.2, 0.1, 0.3][int(torch.randint(0, 3, (1,), generator=generator))]
    mask, terminated = episodes(generator)
    shape = mask.shape
    old = -torch.rand(shape, generator=generator) * 4  # log-probs
    new = old + torch.randn(shape, generator=generator) * 0.3  # ratios around 1, some outside 1 +- eps
    advantages = torch.randn(shape, generator=generator)
    mine_in, reference_in = new.clone().requires_grad_(), new.clone().requires_grad_()
    expected, _ = policy_loss(reference_in, old, advantages, mask, clip_range)
    (expected_grad,) = torch.autograd.grad(expected, reference_in)
    yours = function(mine_in, old.clone(), advantages.clone(), mask.clone(), clip_range)
    if isinstance(yours, tuple):  # (loss, stats) as the library returns is fine too
        yours = yours[0]
    context = rows(mask, terminated, ratio=torch.exp(new - old), advantages=advantages)
    compare("loss", yours, expected, context)
    if not yours.requires_grad:
        raise Mismatch("loss: it has no gradient with respect to logprobs (was something detached?)")
    (your_grad,) = torch.autograd.grad(yours, mine_in, allow_unused=True)
    compare("gradient of the loss with respect to logprobs", torch.zeros_like(new) if your_grad is None else your_grad,
            expected_grad, context)  # fmt: skip
    return f"B={shape[0]}, T={shape[1]}, clip_range={clip_range}"


def check_kl_penalty(function: Callable, generator: torch.Generator) -> str:
    kl_coef = [0.05, 0.1, 0.02][int(torch.randint(0, 3, (1,), generator=generator))]
    mask, _ = episodes(generator)
    logprobs = -torch.rand(mask.shape, generator=generator) * 4
    ref_logprobs = -torch.rand(mask.shape, generator=generator) * 4
    expected_reward, expected_kl = non_score_reward(ref_logprobs, logprobs, kl_coef)
    yours = function(ref_logprobs.clone(), logprobs.clone(), kl_coef)
    if not (isinstance(yours, tuple) and len(yours) == 2):
        raise Mismatch(f"expected (reward, kl), got {type(yours).__name__}")
    context = rows(mask, None, logprobs=logprobs, ref_logprobs=ref_logprobs)
    compare("reward", yours[0], expected_reward, context)
    compare("kl", yours[1], expected_kl, context)
    return f"shape {tuple(mask.shape)}, kl_coef={kl_coef}"


EXERCISES = {  # name: (file, function, checker, the library function it is compared with)
    "gae": ("my_gae.py", "compute_gae", check_gae, "agents.advantages.compute_gae"),
    "policy_loss": ("my_policy_loss.py", "policy_loss", check_policy_loss, "agents.losses.policy_loss"),
    "kl_penalty": ("my_kl_penalty.py", "non_score_reward", check_kl_penalty, "textenv.rewards.non_score_reward"),
}


def shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run(name: str, directory: Path, cases: int) -> bool:
    """Check one exercise; print PASS, FAIL with the first mismatch, or that it is not written yet."""
    file, function_name, checker, reference = EXERCISES[name]
    where = shown(directory / file)
    try:
        function = load(directory, file, function_name)
    except Exception as error:  # a syntax error, a missing function: the reader's to fix
        print(f"FAIL  {name}: could not load {function_name} from {where}: {error!r}")
        return False
    generator = torch.Generator().manual_seed(0)
    for case in range(cases):
        try:
            described = checker(function, generator)
        except NotImplementedError:
            print(f"TODO  {name}: {function_name} in {where} is not written yet")
            return False
        except Mismatch as mismatch:
            print(f"FAIL  {name}: case {case + 1} of {cases}: {mismatch}")
            return False
        except Exception:
            print(f"FAIL  {name}: case {case + 1} of {cases} raised:\n{traceback.format_exc(limit=-2)}")
            return False
    print(f"PASS  {name}: {function_name} equals {reference} on {cases} random batches (last: {described})")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(EXERCISES), action="append", help="check only this exercise")
    parser.add_argument("--solutions", type=Path, default=HERE / "exercises", help="the directory of my_*.py")
    parser.add_argument("--cases", type=int, default=50, help="random batches per exercise")
    args = parser.parse_args(argv)
    results = [run(name, args.solutions, args.cases) for name in (args.only or EXERCISES)]
    print(f"{sum(results)} of {len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
