"""Shared test fixtures: one factory for TokenRLHF-v0 envs on the embedded default task.

The factories are fixtures (``make_env``, ``make_vec``) rather than importable functions, so they work
under any pytest import mode. Both build on CPU unless a call passes ``device`` (``device=None`` is the
env's own default: CUDA when available).
"""

import gymnasium as gym
import pytest
import torch
from gymnasium.vector import AutoresetMode

import textenv  # noqa: F401  (registers TokenRLHF-v0)

ENV_ID = "TokenRLHF-v0"


def new_env(device="cpu", **kwargs) -> gym.Env:
    """A single TokenRLHF-v0 env through ``gym.make`` (with Gymnasium's wrappers)."""
    return gym.make(ENV_ID, device=device, **kwargs)


def new_vec(num_envs: int = 3, autoreset_mode=AutoresetMode.NEXT_STEP, device="cpu", **kwargs) -> gym.vector.VectorEnv:
    """A batched TokenRLHF-v0 env through ``gym.make_vec`` with the vector entry point.

    ``autoreset_mode`` is ``"NextStep"`` (Gymnasium's default) or ``"Disabled"`` (lockstep: every row
    resets together), as a string or an ``AutoresetMode``.
    """
    return gym.make_vec(
        ENV_ID,
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode=autoreset_mode,
        device=device,
        **kwargs,
    )


@pytest.fixture(scope="session")
def make_env():
    """``make_env(**kwargs)``: a single env on the default task, on CPU unless ``device`` is given."""
    return new_env


@pytest.fixture(scope="session")
def make_vec():
    """``make_vec(num_envs=3, autoreset_mode="NextStep", **kwargs)``: a vector env, on CPU unless ``device`` given."""
    return new_vec


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Each test starts with the process's thread count: an example or a command run in-process may set its own
    (the examples and the calculator's report take one thread), and no later result may depend on that."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bf16_cpu(monkeypatch):
    """bf16 on this CPU, native where it has AVX512-BF16 or AMX, else emulated: the bf16 tests then run everywhere.

    textenv refuses bf16 on a CPU without the instructions (a user would get a slower run, not a faster one), but
    torch's bf16 kernels compute the same roundings without them, more slowly: the tests pass the refusal here, so
    that the bf16 code path is exercised on every machine the suite runs on."""
    from textenv.config import bf16_supported

    if not bf16_supported(torch.device("cpu")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        assert bf16_supported(torch.device("cpu"))
