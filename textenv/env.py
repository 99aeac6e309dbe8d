"""TokenRLHF-v0: a language model writes one token per step; a reward model and a KL penalty pay it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from textenv.core import TokenBatchCore
from textenv.default_task import POLICY_DIR, REWARD_MODEL_DIR, load_prompts
from textenv.loading import (
    ModelLike,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    output_vocab_size,
    resolve_device,
)
from textenv.models import sequence_scores

REWARD_MODES = ("sparse", "dense")
PROMPT_TRUNCATION = ("error", "left")


def read_prompts(prompts: Sequence[str] | str | os.PathLike | None, prompt_column: str = "prompt") -> list[str]:
    """Prompts from a list of strings, a text file (one prompt per line) or a ``datasets`` dataset."""
    if prompts is None:
        return load_prompts("train")
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(
                f"prompts file {os.fspath(prompts)!r} does not exist; pass a list of strings or a path to a text "
                "file with one prompt per line"
            )
        return [line for line in path.read_text().splitlines() if line.strip()]
    if hasattr(prompts, "column_names"):  # a datasets.Dataset
        if prompt_column not in prompts.column_names:
            raise ValueError(
                f"the dataset has no column {prompt_column!r} (it has {prompts.column_names}); pass prompt_column="
            )
        prompts = prompts[prompt_column]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return prompts


def make_core(
    num_slots: int,
    *,
    reference_model: ModelLike | None = None,
    reward_model: ModelLike | None = None,
    tokenizer=None,
    prompts: Sequence[str] | str | os.PathLike | None = None,
    prompt_column: str = "prompt",
    max_prompt_tokens: int = 16,
    max_new_tokens: int = 32,
    prompt_truncation: str = "error",
    kl_coef: float = 0.05,
    reward_mode: str = "sparse",
    score_clip: float | None = None,
    missing_eos_penalty: float | None = None,
    temperature: float = 1.0,
    policy: torch.nn.Module | Callable | None = None,
    device: str | torch.device | None = None,
) -> TokenBatchCore:
    """Check every argument, load the models and tokenize the prompts: the constructor both envs share."""
    if num_slots < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_slots}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0 (it scales a penalty), got {kl_coef}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (log-probs use logits / temperature), got {temperature}")
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
    if prompt_truncation not in PROMPT_TRUNCATION:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATION}, got {prompt_truncation!r}")
    if score_clip is not None and score_clip <= 0:
        raise ValueError(f"score_clip must be > 0 or None, got {score_clip}")
    if missing_eos_penalty is not None and missing_eos_penalty < 0:
        raise ValueError(
            f"missing_eos_penalty is subtracted from the score and must be >= 0, got {missing_eos_penalty}"
        )
    if policy is not None and not (isinstance(policy, torch.nn.Module) or callable(policy)):
        raise TypeError(f"policy must be a torch module or a callable, got {type(policy).__name__}")

    device = resolve_device(device)
    reference_source = POLICY_DIR if reference_model is None else reference_model
    if tokenizer is None:
        if isinstance(reference_source, torch.nn.Module):
            raise ValueError("pass tokenizer= when reference_model is a loaded module")
        tokenizer = load_tokenizer(reference_source, what="reference model (and its tokenizer)")
    tokenizer = load_tokenizer(tokenizer)
    reference = load_causal_lm(reference_source, device)
    scorer = load_reward_model(REWARD_MODEL_DIR if reward_model is None else reward_model, device)

    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; episodes end on EOS, so set tokenizer.eos_token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "the tokenizer's PAD token must exist and differ from its EOS token (a model whose PAD is EOS cannot "
            "learn to stop, and the reward model would read the score before the EOS); add one with "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the models' embeddings"
        )
    vocab_size = output_vocab_size(reference)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the reference model predicts only {vocab_size}; "
            "pass the tokenizer the model was trained with"
        )
    reward_vocab = scorer.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > reward_vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the reward model embeds only {reward_vocab}; the env "
            "scores token ids directly, so the reward model must share the policy's tokenizer"
        )
    if isinstance(policy, torch.nn.Module) and output_vocab_size(policy) != vocab_size:
        raise ValueError(
            f"the policy predicts {output_vocab_size(policy)} tokens but the reference model {vocab_size}; "
            "they must share one vocabulary"
        )
    if getattr(scorer.config, "pad_token_id", None) is None:
        scorer.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers pool at the last non-pad token
    for name, model in (("reference model", reference), ("reward model", scorer)):
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit is not None and max_prompt_tokens + max_new_tokens > limit:
            raise ValueError(
                f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} exceeds the {name}'s "
                f"{limit} positions; lower one of them"
            )

    probe = torch.tensor([[tokenizer.eos_token_id]], device=device)
    sequence_scores(scorer, probe, torch.ones_like(probe))  # a reward model without one scalar output raises here

    texts = read_prompts(prompts, prompt_column)
    prompt_ids = [list(ids) for ids in tokenizer(texts)["input_ids"]]
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} ({texts[i]!r}) is empty after tokenization")
        if len(ids) > max_prompt_tokens:
            if prompt_truncation == "error":
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}: "
                    f"{texts[i][:60]!r}; raise max_prompt_tokens or pass prompt_truncation='left' to keep each "
                    "prompt's last max_prompt_tokens tokens"
                )
            prompt_ids[i] = ids[-max_prompt_tokens:]

    return TokenBatchCore(
        num_slots=num_slots,
        tokenizer=tokenizer,
        reference_model=reference,
        reward_model=scorer,
        prompts=texts,
        prompt_ids=prompt_ids,
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        kl_coef=kl_coef,
        reward_mode=reward_mode,
        score_clip=score_clip,
        missing_eos_penalty=missing_eos_penalty,
        temperature=temperature,
        policy=policy,
        vocab_size=vocab_size,
    )


def observation_space(core: TokenBatchCore) -> spaces.Dict:
    """One slot's observation: token ids and attention mask, left-padded to ``context_length``."""
    shape = (core.context_length,)
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, core.vocab_size - 1, shape=shape, dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=shape, dtype=np.int64),
        }
    )


def check_reset_options(options: dict | None, num_prompts: int, known: tuple[str, ...], count: int) -> dict:
    """Validate ``reset`` options; ``prompt_index`` becomes an int64 array of ``count`` entries (or stays None)."""
    options = dict(options or {})
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; known: {', '.join(map(repr, known))}")
    index = options.get("prompt_index")
    if index is not None:
        array = np.asarray(index)
        if not np.issubdtype(array.dtype, np.integer) or array.ndim > 1:
            raise ValueError(f"prompt_index must be an int or a list of ints, got {index!r}")
        if array.ndim == 1 and array.shape != (count,):
            raise ValueError(f"prompt_index must be one int or {count} ints (one per reset slot), got {len(array)}")
        if array.size and not (0 <= array.min() and array.max() < num_prompts):
            raise ValueError(f"prompt_index must lie in 0..{num_prompts - 1}, got {index}")
        options["prompt_index"] = np.broadcast_to(array, (count,)).astype(np.int64)
    return options


def kl_coef_property() -> property:
    """``env.kl_coef``: the KL coefficient of the reward, settable between episodes (an adaptive controller does)."""

    def get(env) -> float:
        return env.core.kl_coef

    def set_(env, value: float) -> None:
        if value < 0:
            raise ValueError(f"kl_coef must be >= 0 (it scales a penalty), got {value}")
        env.core.kl_coef = float(value)

    return property(get, set_, doc=kl_coef_property.__doc__)


class TokenGenerationEnv(gym.Env[dict[str, np.ndarray], int]):
    """
    ## Description

    RLHF as a plain RL problem. A language model (the agent) writes a response to a
    prompt one token at a time; a frozen reward model scores the finished response and
    a KL penalty to a frozen reference model is charged at every token. With no
    arguments the env is the embedded default task: a tiny GPT-2 continuing movie
    review openings, paid by a sentiment reward model (offline, ships with textenv).

    ## Action Space

    ``Discrete(vocab_size)``: the id of the next token, over the reference model's
    output vocabulary.

    ## Observation Space

    ``Dict(input_ids=Box(0, vocab_size - 1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))``
    with ``L = max_prompt_tokens + max_new_tokens``. The context (prompt, then the
    tokens generated so far) is right-aligned: padding is on the left, so the newest
    token is always ``input_ids[-1]``; ``attention_mask`` is 1 on real tokens.

    ## Rewards

    At step t, with ``kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` (log-probs of
    ``logits / temperature``)::

        r_t = -kl_coef * kl_t + score_term_t

    ``score_term_t`` is the reward model's score of prompt + response on the last step
    and 0 before (``reward_mode="sparse"``), or the change in score of consecutive
    prefixes (``"dense"``: the terms sum to the final score minus the prompt's score).
    Scores are clipped to ``±score_clip`` if set; an episode truncated without EOS
    loses ``missing_eos_penalty`` if set. ``log pi(a_t|s_t)`` comes from, in order: the
    caller (``logprobs=`` on the vector env's ``step``), the ``policy`` given to the env,
    or nowhere: then ``r_t = kl_coef * log pi_ref(a_t|s_t) + score_term_t``, which an
    entropy bonus of ``kl_coef`` turns into the same KL-regularised objective.
    ``info["kl_source"]`` says which ("caller", "policy", "reference_only").

    ## Starting State

    A prompt drawn uniformly from ``prompts`` with ``self.np_random`` (or the one given
    by ``options={"prompt_index": i}``).

    ## Episode End

    Terminated when the action is the EOS token. Truncated after ``max_new_tokens``
    actions without EOS. Calling ``step`` after either without ``reset`` raises.

    ## Info

    Every step: ``ref_logprob``, ``logprob`` and ``kl`` (None when unknown),
    ``non_score_reward``, ``kl_source``, ``score`` (the raw reward-model score on the
    last step, else None). On the last step also ``response`` (decoded text). Reset:
    ``prompt`` and ``prompt_index``.

    ## Arguments

    - ``reference_model``, ``reward_model``: loaded modules, local directories or hub
      names (default: the embedded task). Both are frozen (eval mode, no grad) on
      ``device`` (default CUDA when available, else CPU).
    - ``tokenizer``: tokenizer or its directory (default: the reference model's).
      PAD must exist and differ from EOS.
    - ``prompts``: list of strings, text file (one per line), or a ``datasets`` dataset
      with ``prompt_column``. Default: the embedded task's train prompts.
    - ``max_prompt_tokens`` (16), ``max_new_tokens`` (32); ``prompt_truncation``:
      ``"error"`` (default: longer prompts raise at construction) or ``"left"`` (keep
      each prompt's last ``max_prompt_tokens`` tokens).
    - ``kl_coef`` (0.05), ``reward_mode`` (``"sparse"``), ``score_clip`` (None),
      ``missing_eos_penalty`` (None), ``temperature`` (1.0).
    - ``policy``: a causal LM (stepped with its own KV cache, log-probs of ``logits /
      temperature``) or a callable mapping the observation batch (a dict of (N, L) arrays;
      N = 1 here, num_envs in the vector env) to log-probs of shape (N, vocab_size),
      already at the sampling temperature; used for the KL term.
    - ``render_mode``: ``"ansi"`` (``render()`` returns the decoded context) or ``"human"`` (prints it).

    ## Version History

    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.core = make_core(1, **kwargs)
        self.observation_space = observation_space(self.core)
        self.action_space = spaces.Discrete(self.core.vocab_size)

    kl_coef = kl_coef_property()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_reset_options(options, len(self.core.prompts), ("prompt_index",), 1)
        index = options.get("prompt_index")
        index = int(self.np_random.integers(len(self.core.prompts))) if index is None else int(index[0])
        self.core.reset(np.array([0]), np.array([index]))
        if self.render_mode == "human":
            self.render()
        return self._observation(), {"prompt": self.core.prompts[index], "prompt_index": index}

    def step(self, action: int):
        if self.core.done[0]:
            raise RuntimeError("step() called on an episode that has ended (or never started); call reset() first")
        if isinstance(action, bool) or np.ndim(action) != 0 or not np.issubdtype(np.asarray(action).dtype, np.integer):
            raise TypeError(f"action must be an integer token id, got {action!r} of type {type(action).__name__}")
        result = self.core.step(np.array([action]))
        info: dict[str, Any] = {"kl_source": result.infos["kl_source"][0]}
        for key in ("ref_logprob", "logprob", "kl", "non_score_reward", "score"):
            value = float(result.infos[key][0])
            info[key] = None if np.isnan(value) else value
        if result.terminated[0] or result.truncated[0]:
            info["response"] = result.infos["response"][0]
        if self.render_mode == "human":
            self.render()
        return (
            self._observation(),
            float(result.rewards[0]),
            bool(result.terminated[0]),
            bool(result.truncated[0]),
            info,
        )

    def _observation(self) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.core.observation().items()}

    def render(self) -> str | None:
        if self.render_mode is None:
            gym.logger.warn("render() needs a render_mode: make the env with render_mode='ansi' or 'human'")
            return None
        text = self.core.render_row(0)
        if self.render_mode == "human":
            print(text)
            return None
        return text
