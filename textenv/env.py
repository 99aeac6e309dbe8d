"""TokenRLHF-v0: a language model writes one token per step; a reward model and a KL penalty pay it."""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textenv.config import TokenEnvConfig, TokenEnvSettings, check_kl_coef, resolve_config
from textenv.core import TokenBatchCore
from textenv.lm import has_prefix_scores, prefix_scores
from textenv.loading import load_task
from textenv.rewards import clip_score

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # a dependency of torch
    from typing_extensions import Unpack


def make_core(config: TokenEnvConfig, num_slots: int) -> TokenBatchCore:
    """Resolve ``config`` (its task's values for the fields it leaves unset), load and check what it names, and
    hold it in a core of ``num_slots`` slots."""
    config = resolve_config(config)
    return TokenBatchCore(config, load_task(config), num_slots)


def observation_space(core: TokenBatchCore) -> spaces.Dict:
    """One slot's observation: token ids and attention mask, left-padded to ``context_length``."""
    shape = (core.context_length,)
    keys = {
        "input_ids": spaces.Box(0, core.vocab_size - 1, shape=shape, dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, shape=shape, dtype=np.int64),
    }
    if core.multi_turn:  # episodes of several turns: which tokens the agent wrote
        keys["agent_mask"] = spaces.Box(0, 1, shape=shape, dtype=np.int64)
    return spaces.Dict(keys)


def check_render_mode(render_mode: str | None, metadata: dict) -> None:
    if render_mode is not None and render_mode not in metadata["render_modes"]:
        raise ValueError(f"render_mode must be one of {metadata['render_modes']} or None, got {render_mode!r}")


def check_reset_options(options: dict | None, num_prompts: int, known: tuple[str, ...], count: int) -> dict:
    """Validate ``reset`` options; ``prompt_index`` becomes an int64 array of ``count`` entries (or stays None)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict (or None), got {options!r} of type {type(options).__name__}")
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


class CoreView:
    """What both envs expose of their core: the KL coefficient (settable), the resolved config, the frozen models,
    the prompts with their data rows, and the answer check. Learners read these, never the core."""

    core: TokenBatchCore

    @property
    def kl_coef(self) -> float:
        """The KL coefficient of the reward, settable between episodes (an adaptive controller does)."""
        return self.core.kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        self.core.kl_coef = check_kl_coef(value)

    @property
    def config(self) -> TokenEnvConfig:
        """The settings the env runs with: the ones it was given, each unset field its task's
        (``textenv.config.resolve_config``)."""
        return self.core.config

    @property
    def prompts(self) -> Sequence[str]:
        """The prompts episodes start from, as text (a conversation as the chat template renders it);
        ``reset(options={"prompt_index": i})`` starts on ``prompts[i]``. Read-only."""
        return self.core.prompts

    @property
    def rows(self) -> Sequence[dict]:
        """Each prompt's data row, by prompt index: its other columns (e.g. ``answer``), ``{}`` when it has none.
        Read-only."""
        return self.core.rows

    @property
    def accuracy_term(self) -> str | None:
        """The reward function that says whether an answer is right, where there is one: its value
        ``info["reward/" + accuracy_term]`` is 1 for a right answer and 0 for a wrong one (evaluation's accuracy
        and pass@k). Set by ``TokenEnvConfig.accuracy_term``, else the task's (arithmetic, calculator)."""
        return self.core.accuracy

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def reference_model(self):
        return self.core.reference.model

    @property
    def reward_model(self):
        return self.core.reward_model

    @property
    def reward_tokenizer(self):
        """The reward model's own tokenizer, where it reads the text with it; None where it reads the policy's token
        ids, or there is no reward model."""
        return getattr(self.core.scorer, "reward_tokenizer", None)

    def prefix_scores_obstacle(self) -> str | None:
        """Why this env cannot score prefixes (``prefix_scores``), or None where it can."""
        reward_model = self.core.reward_model
        if reward_model is None:
            return "this env has no reward model, so no prefix has a score"
        if self.reward_tokenizer is not None:
            return (
                "this env's reward model reads text with its own tokenizer (reward_tokenizer), so its scores have no "
                "place among the policy's tokens"
            )
        if not has_prefix_scores(reward_model):
            return f"this env's reward model ({type(reward_model).__name__}) has no per-position score head ('score')"
        return None

    def prefix_scores(self, input_ids, attention_mask):
        """The score the env would pay each prefix of these rows had the episode ended there: the reward model's
        score of the tokens up to each position, clipped to ``score_clip`` (``textenv.lm.prefix_scores``, one
        forward), before the reward functions and the missing-EOS penalty. ``input_ids``/``attention_mask`` (B, T)
        tensors of the policy's token ids; returns (B, T) float32 on the reward model's device.

        What a learner may read as a feature of the state (``agents``' value prior). Refused where
        ``prefix_scores_obstacle`` names a reason: no reward model, one that reads text with its own tokenizer (its
        positions are not these tokens), or one without a per-position score head.
        """
        obstacle = self.prefix_scores_obstacle()
        if obstacle is not None:
            raise ValueError(f"{obstacle}: prefix scores need a causal reward model of the policy's tokens")
        device = next(self.core.reward_model.parameters()).device
        scores = prefix_scores(self.core.reward_model, input_ids.to(device), attention_mask.to(device))
        return clip_score(scores, self.core.config.score_clip)


class TokenGenerationEnv(CoreView, gym.Env[dict[str, np.ndarray], int]):
    """
    ## Description

    RLHF as a plain RL problem. A language model (the agent) writes a response to a
    prompt one token at a time; the episode's score (a frozen reward model's, reward
    functions', or both) pays the finished response and a KL penalty to a frozen
    reference model is charged at every token. With no arguments the env is the
    embedded default task: a tiny GPT-2 continuing movie review openings, paid by a
    sentiment reward model (offline, ships with textenv). The other embedded tasks:
    ``task="arithmetic"`` (answer ``17+25=``, paid by exact match) and
    ``task="calculator"`` (the same problems, with a calculator the agent may call).

    An episode may have several turns (``interaction``; the calculator task has one):
    when the agent ends a turn, the interaction appends its reply's tokens to the
    context (they are not actions: no step, no KL term), may pay a turn reward, or ends
    the episode.

    ## Action Space

    ``Discrete(vocab_size)``: the id of the next token, over the reference model's
    output vocabulary.

    ## Observation Space

    ``Dict(input_ids=Box(0, vocab_size - 1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))``
    with ``L = max_prompt_tokens + max_new_tokens``. The context (prompt, then the
    tokens generated so far) is right-aligned: padding is on the left, so the newest
    token is always ``input_ids[-1]``; ``attention_mask`` is 1 on real tokens. With an
    interaction the window holds the whole conversation, ``L = max_prompt_tokens +
    max_turns * max_new_tokens + (max_turns - 1) * max_env_tokens``, and the observation
    also has ``agent_mask=Box(0, 1, (L,), int64)``: 1 on the tokens the agent wrote, 0 on
    the prompt, the replies and the padding.

    ## Rewards

    At step t, with ``kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` (log-probs of
    ``logits / temperature``)::

        r_t = -kl_coef * kl_t + score_term_t

    ``score_term_t`` is the episode's score on the last step and 0 before
    (``reward_mode="sparse"``). The episode's score is the reward model's score of
    prompt + response (clipped to ``±score_clip``, 5 by default) plus each reward
    function's weighted value (``reward_fns``, ``reward_weights``). With ``"dense"``, the
    reward model's part is paid as the change in score of consecutive prefixes instead
    (the terms sum to its final score minus the prompt's score). An episode truncated
    without EOS loses ``missing_eos_penalty`` if set. A ``step_reward_fn`` adds its value
    for each step's token to that step's reward; with an interaction, a reply's reward
    is added to the reward of the step that ended the turn. ``log pi(a_t|s_t)`` comes
    from, in order: the caller (``logprobs=`` on the vector env's ``step``), the ``policy``
    given to the env, or nowhere: then ``r_t = kl_coef * log pi_ref(a_t|s_t) + score_term_t``,
    which an entropy bonus of ``kl_coef`` turns into the same KL-regularised objective.
    ``info["kl_source"]`` says which ("caller", "policy", "reference_only").

    ## Starting State

    A prompt drawn uniformly from ``prompts`` with ``self.np_random`` (or the one given
    by ``options={"prompt_index": i}``).

    ## Episode End

    Terminated when the action is the EOS token; with an interaction, when it answers a
    turn with ``done``. Truncated after ``max_new_tokens`` actions without EOS; with an
    interaction, when a turn reaches ``max_new_tokens`` without ending or a reply comes
    after the ``max_turns``-th turn. Calling ``step`` after either without ``reset`` raises.

    ## Info

    Every step: ``ref_logprob``, ``logprob`` and ``kl`` (None when unknown),
    ``non_score_reward``, ``kl_source``, ``score`` (on the last step the episode's score:
    the reward model's, unclipped, plus the weighted reward functions'; else None), and
    ``reward/<name>`` for each paying term (``reward/reward_model`` and one per reward
    function: its raw, unweighted value on the last step, else None); ``step_reward``
    with a ``step_reward_fn``. With an interaction, ``turn_reward`` (the reply's reward on
    the step that ended a turn, else None) and ``env_tokens`` (the reply's token ids,
    appended to the context after that step; else []). On the last step also
    ``response`` (decoded text). Reset: ``prompt``, ``prompt_index`` and ``row`` (the
    prompt's other data columns, e.g. ``answer``). ``textenv.info`` lists the keys.

    ## Arguments

    ``config``, a ``textenv.TokenEnvConfig``, or its fields as keyword arguments
    (one or the other; ``textenv.config.TokenEnvSettings`` types them). A field left
    unset takes its task's value (``textenv.config.resolve_config``):

    - ``task``: the embedded task, ``"reviews"`` (default), ``"arithmetic"`` or
      ``"calculator"``; ``split`` (``"train"``) chooses its prompts.
    - ``reference_model``, ``reward_model``: loaded modules, local directories or hub
      names (default: the task's; with ``reward_fns`` no reward model unless given).
      Both are frozen (eval mode, no grad) on ``device`` (default CUDA when available,
      else CPU).
    - ``reward_fns``: callables ``f(prompt, response, response_ids, row) -> float`` (see
      ``textenv.reward_fns``; default: the task's), ``reward_weights``, ``step_reward_fn``;
      ``accuracy_term``: the reward function that says an answer is right.
    - ``tokenizer``: tokenizer or its directory (default: the reference model's).
      PAD must exist and differ from EOS.
    - ``prompts``: list of strings, conversations or data rows (dicts), a text file (one
      per line), a JSON-lines file, or a ``datasets`` dataset with ``prompt_column``.
      Default: the task's prompts of ``split``.
    - ``max_prompt_tokens``, ``max_new_tokens`` (the task's: reviews 16 and 32, arithmetic
      8 and 32, calculator 8 and 6); ``prompt_truncation``: ``"error"`` (default: longer prompts
      raise at construction) or ``"left"`` (keep each prompt's last ``max_prompt_tokens`` tokens).
    - ``kl_coef`` (0.05), ``reward_mode`` (``"sparse"``), ``score_clip`` (5.0),
      ``missing_eos_penalty`` (None), ``temperature`` (1.0).
    - ``interaction`` (see ``textenv.turns``; default: the task's), ``end_of_turn_token``
      (EOS), ``stop_strings``, ``max_turns`` and ``max_env_tokens`` (the task's: 3 and 6 for
      the calculator, else 4 and 16).
    - ``policy``: a causal LM (stepped with its own KV cache, log-probs of ``logits /
      temperature``) or a callable mapping the observation batch (a dict of (N, L) arrays;
      N = 1 here, num_envs in the vector env) to log-probs of shape (N, vocab_size),
      already at the sampling temperature; used for the KL term.
    - ``render_mode``: ``"ansi"`` (``render()`` returns the decoded context) or ``"human"`` (prints it).

    ## Version History

    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
        config: TokenEnvConfig | None = None,
        render_mode: str | None = None,
        **settings: Unpack[TokenEnvSettings],
    ):
        check_render_mode(render_mode, self.metadata)
        self.render_mode = render_mode
        self.core = make_core(TokenEnvConfig.from_kwargs(config, settings), 1)
        self.observation_space = observation_space(self.core)
        self.action_space = spaces.Discrete(self.core.vocab_size)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = check_reset_options(options, len(self.core.prompts), ("prompt_index",), 1)
        index = options.get("prompt_index")
        index = int(self.np_random.integers(len(self.core.prompts))) if index is None else int(index[0])
        self.core.reset(np.array([0]), np.array([index]))
        if self.render_mode == "human":
            self.render()
        info = {"prompt": self.core.prompts[index], "prompt_index": index, "row": copy.deepcopy(self.core.rows[index])}
        return self._observation(), info

    def step(self, action: int):
        if self.core.done[0]:
            raise RuntimeError("step() called on an episode that has ended (or never started); call reset() first")
        if isinstance(action, bool) or np.ndim(action) != 0 or not np.issubdtype(np.asarray(action).dtype, np.integer):
            raise TypeError(f"action must be an integer token id, got {action!r} of type {type(action).__name__}")
        result = self.core.step(np.array([action]))
        if self.render_mode == "human":
            self.render()
        return (
            self._observation(),
            float(result.rewards[0]),
            bool(result.terminated[0]),
            bool(result.truncated[0]),
            result.slot_info(0),
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
