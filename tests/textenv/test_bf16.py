"""precision='bf16': the env's frozen models stored in bf16, and its rewards against an uncached bf16 recomputation.

1. The reference and reward models the env loads are bf16 (fp32 at 'fp32'); a model passed loaded keeps its dtype.
2. Every finished episode's per-step reward, reference log-prob and score equal plain full-sequence forwards of
   the same bf16 models (no cache, no padding, batch of one) to ``LOGPROB_ATOL``, ``SCORE_ATOL`` and
   ``REWARD_ATOL`` (fp32's tolerance with native bf16 kernels; docs/departures.md, "bf16"), and differ from the
   fp32 env's by a measured amount, bounded here.
3. bf16 where the CPU lacks it, or a precision that is not one, is refused naming the setting (these run anywhere).

The tests that run bf16 run on every CPU: natively with AVX512-BF16 or AMX, else emulated by torch's kernels
(the ``bf16_cpu`` fixture of tests/conftest.py passes textenv's refusal).
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.models import Episode
from tests.textenv.test_core import KL_COEF, SETTINGS, Script, run_vector, uncached_ref_logprobs, uncached_score
from textenv.config import bf16_supported, resolve_precision
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR

needs_bf16 = pytest.mark.usefixtures("bf16_cpu")  # native or emulated bf16 (tests/conftest.py)
# the cached bf16 env against the uncached bf16 recomputation. With oneDNN's native bf16 kernels (AVX512-BF16 or AMX)
# fp32's tolerance (measured: at most 8.4e-7 on the log-probs, 0 on the scores; a bf16 rounding step of a logit would
# be about 0.03, so this is no bf16-sized slack). With torch's bf16 kernels on a CPU without them (emulated) a
# one-token step and a whole-sequence forward round differently, by bf16 rounding steps (measured by
# benchmarks/bf16_exactness.py: docs/results/bf16_exactness.json, quoted in docs/departures.md, "bf16")
NATIVE_BF16 = bf16_supported(torch.device("cpu"))
LOGPROB_ATOL, SCORE_ATOL, REWARD_ATOL = (1e-5, 1e-5, 1e-5) if NATIVE_BF16 else (0.1, 0.005, 0.01)
# the bf16 env against the fp32 env, on the same episodes (measured: at most 0.072 on a reference log-prob, 0.0048 on
# a score; docs/departures.md, "bf16")
FP32_GAP_LOGPROB, FP32_GAP_SCORE = 0.1, 0.01


def load_bf16_models():
    """The default task's tokenizer, reference and reward model, loaded in bf16 (the recomputation's models)."""
    load = dict(dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR, **load).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(REWARD_MODEL_DIR, **load).eval()
    return AutoTokenizer.from_pretrained(POLICY_DIR), reference, reward_model


@pytest.fixture(scope="module")
def bf16_models():
    return load_bf16_models()


def scripted_episodes(env, tokenizer, seed: int = 3, caller_logprobs: bool = True) -> list[Episode]:
    """The finished episodes of 45 scripted steps of ``env`` (5 envs, autoreset off), a reset every 3."""
    return run_vector(env, Script(tokenizer, 5, seed=seed), steps=45, caller_logprobs=caller_logprobs, reset_every=3)


def uncached_figures(episode: Episode, reference, reward_model) -> tuple[np.ndarray, float, np.ndarray]:
    """``episode``'s reference log-probs, score and per-step rewards from plain full-sequence forwards of
    ``reference`` and ``reward_model`` (no cache, no padding, a batch of one)."""
    ref = uncached_ref_logprobs(reference, episode)
    score = uncached_score(reward_model, episode.prompt + episode.actions)
    rewards = -KL_COEF * (np.array(episode.logprobs) - ref)
    rewards[-1] += score
    return ref, score, rewards


def dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


@needs_bf16
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_env_stores_the_frozen_models_it_loads_at_its_precision(make_vec, precision):
    env = make_vec(2, precision=precision, **SETTINGS)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert dtypes(env.unwrapped.reference_model) == {expected}
    assert dtypes(env.unwrapped.reward_model) == {expected}


@needs_bf16
def test_a_model_passed_loaded_keeps_its_dtype(make_vec):
    reference = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    env = make_vec(2, precision="bf16", reference_model=reference, tokenizer=POLICY_DIR, **SETTINGS)
    assert env.unwrapped.reference_model is reference and dtypes(reference) == {torch.float32}
    assert dtypes(env.unwrapped.reward_model) == {torch.bfloat16}  # loaded from its directory: cast


def check_bf16_episode(episode: Episode, reference, reward_model) -> None:
    """The env's figures against an uncached recomputation with the same bf16 models, to the ``*_ATOL`` above."""
    ref, score, rewards = uncached_figures(episode, reference, reward_model)
    np.testing.assert_allclose(episode.ref_logprobs, ref, atol=LOGPROB_ATOL, rtol=0)
    assert episode.score == pytest.approx(score, abs=SCORE_ATOL)
    np.testing.assert_allclose(episode.rewards, rewards, atol=REWARD_ATOL, rtol=0)


@needs_bf16
def test_bf16_rewards_match_an_uncached_bf16_recomputation(bf16_models, make_vec):
    tokenizer, reference, reward_model = bf16_models
    env = make_vec(5, autoreset_mode=AutoresetMode.DISABLED, precision="bf16", **SETTINGS)
    finished = scripted_episodes(env, tokenizer)
    assert len(finished) >= 10 and any(e.truncated for e in finished) and any(e.terminated for e in finished)
    for episode in finished:
        check_bf16_episode(episode, reference, reward_model)


@needs_bf16
def test_bf16_differs_from_fp32_by_a_bounded_amount(make_vec):
    """The same scripted episodes in both precisions: bf16 moves the reference log-probs and the scores, by less
    than the documented bounds (docs/departures.md, "bf16")."""
    runs = {}
    for precision in ("fp32", "bf16"):
        env = make_vec(5, autoreset_mode=AutoresetMode.DISABLED, precision=precision, **SETTINGS)
        runs[precision] = scripted_episodes(env, env.unwrapped.tokenizer, caller_logprobs=False)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert [e.actions for e in fp32] == [e.actions for e in bf16]  # scripted: the same episodes
    logprob_gap = max(np.abs(np.subtract(a.ref_logprobs, b.ref_logprobs)).max() for a, b in zip(fp32, bf16))
    score_gap = max(abs(a.score - b.score) for a, b in zip(fp32, bf16))
    assert 0 < logprob_gap < FP32_GAP_LOGPROB
    assert 0 < score_gap < FP32_GAP_SCORE


def test_bf16_is_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ValueError, match=r"precision 'bf16' \(--precision bf16\).*AVX512-BF16.*--precision fp32"):
        resolve_precision("bf16", "cpu")
    with pytest.raises(ValueError, match="precision 'bf16'"):
        gym.make("TokenRLHF-v0", precision="bf16", device="cpu")  # before any model loads


def test_the_default_precision_is_fp32_on_the_cpu_and_a_wrong_one_is_refused():
    assert resolve_precision(None, "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        gym.make("TokenRLHF-v0", precision="fp16")


def test_the_departures_doc_quotes_the_emulated_bf16_figures_and_the_bounds_cover_them():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    figures = json.loads((root / "docs" / "results" / "bf16_exactness.json").read_text())["emulated"]
    text = " ".join((root / "docs" / "departures.md").read_text().split())
    sentence = (
        f"over {figures['episodes']} scripted episodes ({figures['steps']} steps) at most "
        f"{figures['ref_logprob_max']:.2g} on a reference log-prob ({figures['ref_logprob_mean']:.2g} on average), "
        f"{figures['score_max']:.2g} on a score and {figures['reward_max']:.2g} on a reward"
    )
    assert sentence in text, sentence
    assert "which the test bounds by 0.1, 0.005 and 0.01" in text
    assert figures["ref_logprob_max"] < 0.1 and figures["score_max"] < 0.005 and figures["reward_max"] < 0.01
