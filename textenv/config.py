"""``TokenEnvConfig``: every setting of TokenRLHF-v0, its default and its check, in one place.

Both envs build one (``gym.make("TokenRLHF-v0", max_new_tokens=8)`` is
``TokenEnvConfig(max_new_tokens=8)``), and the trainer's and the evaluator's
command lines are made from it, so each default is written here and nowhere else.

A field whose default depends on the task is ``None`` (or empty) until
``resolve_config`` fills it from the task's preset (``textenv.tasks``): a value
the caller set wins over the preset, and the preset over the base default. The
envs, the trainer and ``python -m agents.evaluate`` all run on what
``resolve_config`` returns; each field's docstring says its effective default.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Annotated, Literal, TypedDict

import torch
import tyro

from textenv.reward_fns import RewardFnLike, RewardFnsLike
from textenv.tasks import LIMITS, TaskName, check_task, get_task
from textenv.turns import Interaction

# On the command line a model, tokenizer or prompt file is a path or hub name;
# from Python it may also be a loaded object.
ModelLike = str | os.PathLike | torch.nn.Module
AsPath = tyro.conf.arg(constructor=str | None)

RewardMode = Literal["sparse", "dense"]
PromptTruncation = Literal["error", "left"]
Precision = Literal["fp32", "bf16"]


@dataclass
class TokenEnvConfig:
    """The task an env poses: models, prompts, episode limits and the reward."""

    task: TaskName | str = "reviews"
    """The embedded task whose preset the unset fields take: 'reviews' (a reward model pays positive movie
    reviews), 'arithmetic' (the reward function exact_match pays the right sum of '17+25=') or 'calculator' (the
    same, with a calculator the agent may call in a turn of its own); or 'reasoning_gym:NAME' (a reasoning-gym
    generator's questions paid by its score_answer; the reasoning-gym extra, docs/adapters.md)."""
    reward_model: Annotated[ModelLike | None, AsPath] = None
    """Reward model: a loaded sequence classifier with one label, a local directory or a hub name. Default: the
    task's (reviews: its sentiment model; arithmetic and calculator have none) when no reward_fns are given; with
    reward_fns, none (nothing is loaded)."""
    reward_fns: Annotated[
        RewardFnsLike, tyro.conf.arg(name="reward-fn", constructor=tuple[str, ...]), tyro.conf.UseAppendAction
    ] = ()
    """Reward functions, summed with the reward model's score: callables f(prompt, response, response_ids, row)
    -> float, a {name: f} dict, or module:function text (--reward-fn, repeatable). Empty: the task's own
    (arithmetic: exact_match; calculator: final_answer; reviews: none)."""
    reward_weights: Annotated[Sequence[float], tyro.conf.arg(constructor=tuple[float, ...])] = ()
    """One weight per reward function (default 1 each)."""
    accuracy_term: str | None = None
    """The reward function whose value (1 right, 0 wrong) says whether an answer is right: evaluation reports its
    mean as accuracy and pass@k. Default: the task's (arithmetic: exact_match; calculator: final_answer) when the
    task's own reward functions pay, else none."""
    step_reward_fn: Annotated[RewardFnLike | None, AsPath] = None
    """Process reward: f(prompt, response_ids, row) -> float, called on every step, added to that step's reward
    (a callable or module:function text)."""
    prompts: Annotated[Sequence[str | list[dict] | dict] | str | os.PathLike | None, AsPath] = None
    """Prompts: a list of strings, chat conversations or data rows (dicts with a prompt_column key); a text file
    (one a line), a JSON-lines file or a saved ``datasets`` directory; or a ``datasets`` dataset. A row's other
    columns reach the reward functions and ``info["row"]``. Default: the task's prompts of ``split``."""
    prompt_column: str = "prompt"
    """The column of a ``datasets`` dataset (or the key of a JSON-lines or dict row) that holds the prompt."""
    split: str = "train"
    """The split of the task's prompts, or of a ``datasets`` dataset dict (saved or loaded), to draw prompts from.
    Prompts without splits (a list, a file, a single dataset) have every row in 'train'; another split of them is
    refused."""
    chat_template: bool = False
    """Apply the tokenizer's chat template (with the generation prompt) to string prompts, each as one user
    message. Prompts given as conversations (lists of {'role', 'content'} dicts) always go through it."""
    max_prompt_tokens: int | None = None
    """Longest prompt, in tokens. Default: the task's (reviews 16, arithmetic 8, calculator 8)."""
    max_new_tokens: int | None = None
    """Longest response (with an interaction: longest agent turn); an episode that reaches it is truncated.
    Default: the task's (reviews 32, arithmetic 32, calculator 6)."""
    prompt_truncation: PromptTruncation = "error"
    """A longer prompt: 'error' raises at construction, 'left' keeps its last max_prompt_tokens tokens."""
    kl_coef: float = 0.05
    """beta in r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) + score term."""
    reward_mode: RewardMode = "sparse"
    """'sparse': the score on the last step; 'dense': score differences of consecutive prefixes (in episodes of
    several turns, of the contexts at consecutive turns' ends, paid on each turn's last token)."""
    score_clip: float | None = 5.0
    """Clip reward-model scores to +-score_clip in the reward, as DeepSpeed-Chat does (None: no clip)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of an episode truncated without EOS (None: no penalty)."""
    temperature: float = 1.0
    """Every log-prob (policy and reference) is of softmax(logits / temperature)."""
    interaction: Annotated[Interaction | type | str | None, AsPath] = None
    """Multi-turn episodes: an object whose respond(turn) answers each turn the agent ends (textenv.turns), its
    class, or module:name text (a class is instantiated, once per env). Default: the task's (calculator:
    textenv.calculator.Calculator; the others have none)."""
    end_of_turn_token: int | str | None = None
    """With an interaction: the token that ends an agent turn (default: EOS): an id, or a text that tokenizes to
    exactly one token (that token). EOS always ends it."""
    stop_strings: Sequence[str] = ()
    """With an interaction: a turn also ends when its text ends with one of these."""
    max_turns: int | None = None
    """With an interaction: the most agent turns in an episode (a reply after the last one truncates it).
    Default: the task's (reviews 4, arithmetic 4, calculator 3)."""
    max_env_tokens: int | None = None
    """With an interaction: the longest reply, in tokens. Default: the task's (reviews 16, arithmetic 16,
    calculator 6)."""
    reference_model: Annotated[ModelLike | None, tyro.conf.Suppress] = None
    """Reference model: a loaded causal LM, a local directory or a hub name. Default: the task's SFT policy.
    Frozen on ``device``; its output vocabulary is the action space."""
    tokenizer: Annotated[str | os.PathLike | object | None, tyro.conf.Suppress] = None
    """Tokenizer or its directory (default: the reference model's). PAD must exist and differ from EOS."""
    reward_tokenizer: Annotated[str | os.PathLike | object | None, AsPath] = None
    """The reward model's own tokenizer, or its directory (default: the one saved beside the reward model, if
    any). When its vocabulary differs from the policy's, the reward model reads the prompt text and the decoded
    response, re-tokenized (one tokenization and one uncached forward per scoring); else it reads token ids."""
    policy: Annotated[torch.nn.Module | Callable | None, tyro.conf.Suppress] = None
    """For the KL term when the caller passes no log-probs: a causal LM (stepped with its own KV cache)
    or a callable from the observation batch to log-probs (N, vocab_size)."""
    device: Annotated[str | torch.device | None, tyro.conf.Suppress] = None
    """Where the frozen models run (default: CUDA when available, else CPU)."""
    precision: Precision | None = None
    """'fp32' or 'bf16': the dtype of the reference and reward models the env loads from a directory or hub name
    (cast once, at load: bf16 halves their memory; a model passed loaded runs in the dtype it has), and in training
    the arithmetic of the policy's and critic's forwards (bf16 autocast; the trained weights and Adam's moments stay
    fp32). bf16 needs CUDA with bf16, or a CPU with AVX512-BF16 or AMX (refused elsewhere). Default: bf16 on a GPU
    that has it, else fp32 (on the CPU bf16 was not faster on the default task: docs/scaling.md)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise on a setting out of range, of the wrong type or not finite, naming the field."""
        for name in LIMITS:  # None: the task's
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_kl_coef(self.kl_coef)
        check_float("temperature", self.temperature, "> 0 (log-probs use logits / temperature)", lambda t: t > 0)
        if self.score_clip is not None:
            check_float("score_clip", self.score_clip, "> 0 or None", lambda c: c > 0)
        if self.missing_eos_penalty is not None:
            check_float(
                "missing_eos_penalty",
                self.missing_eos_penalty,
                ">= 0 (it is subtracted from the score)",
                lambda p: p >= 0,
            )
        check_task(self.task)
        if not isinstance(self.split, str) or not self.split:
            raise TypeError(f"split must be a split's name, e.g. 'train', got {self.split!r}")
        check_choice("reward_mode", self.reward_mode, RewardMode)
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise TypeError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")
        check_choice("prompt_truncation", self.prompt_truncation, PromptTruncation)
        if self.precision is not None:
            check_choice("precision", self.precision, Precision)
        if not isinstance(self.chat_template, bool):
            raise TypeError(f"chat_template must be True or False, got {self.chat_template!r}")
        if self.accuracy_term is not None and not isinstance(self.accuracy_term, str):
            raise TypeError(f"accuracy_term must be a reward function's name (str), got {self.accuracy_term!r}")
        if not isinstance(self.prompt_column, str):
            raise TypeError(f"prompt_column must be a column name (str), got {self.prompt_column!r}")
        if self.policy is not None and not (isinstance(self.policy, torch.nn.Module) or callable(self.policy)):
            raise TypeError(f"policy must be a torch module or a callable, got {type(self.policy).__name__}")

    def window(self, turns: bool) -> int:
        """Length of the observation window: the longest prompt plus the longest response, or with ``turns`` the
        longest prompt, ``max_turns`` agent turns and the replies between them. Needs the limits resolved
        (``resolve_config``)."""
        unset = [name for name in LIMITS if getattr(self, name) is None]
        if unset:
            raise ValueError(f"{', '.join(unset)} unset: the window is of a resolved config (resolve_config)")
        if not turns:
            return self.max_prompt_tokens + self.max_new_tokens
        return (
            self.max_prompt_tokens + self.max_turns * self.max_new_tokens + (self.max_turns - 1) * self.max_env_tokens
        )

    def agent_tokens(self, turns: bool) -> int:
        """The most tokens the agent writes in an episode: ``max_new_tokens``, or with ``turns`` that for each of
        ``max_turns`` turns (the replies between them are not the agent's). Needs the limits resolved."""
        if self.max_new_tokens is None or (turns and self.max_turns is None):
            raise ValueError("max_new_tokens or max_turns unset: agent_tokens is of a resolved config (resolve_config)")
        return self.max_new_tokens * (self.max_turns if turns else 1)

    @property
    def context_length(self) -> int:
        """Length of the observation window of a single-turn episode: the longest prompt plus the longest
        response (see ``window`` for episodes of several turns)."""
        return self.window(turns=False)

    @classmethod
    def from_kwargs(cls, config: TokenEnvConfig | None, kwargs: TokenEnvSettings) -> TokenEnvConfig:
        """The config an env was given, or one built from its keyword arguments (not both); unresolved."""
        if config is not None:
            if kwargs:
                raise TypeError(f"pass either config= or keyword arguments, not both (got {sorted(kwargs)})")
            if not isinstance(config, TokenEnvConfig):
                raise TypeError(f"config must be a TokenEnvConfig, got {type(config).__name__}")
            config.validate()  # its fields may have been set after construction
            return config
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(
                f"unknown env arguments {unknown}; TokenEnvConfig takes {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**kwargs)


def resolve_config(config: TokenEnvConfig) -> TokenEnvConfig:
    """The settings an env runs with: ``config`` with every field left unset taken from its task's preset.

    A value the caller set wins over the preset (``textenv.tasks.EmbeddedTask``), and the
    preset over the base default: the episode limits (None: the task's ``limits``), the
    reference model (None: the task's SFT policy), the reward functions (empty: the task's),
    the reward model (None: the task's when no reward functions were given, else none), the
    accuracy term (None: the task's when its own reward functions pay) and the interaction
    (None: the task's). Prompts left unset stay None: the env reads the task's prompts of
    ``split``. A resolved config resolves to itself. Both envs, the trainer and
    ``python -m agents.evaluate`` run on what this returns.
    """
    config.validate()
    task = get_task(config.task)
    limits = {name: getattr(task.limits, name) for name in LIMITS if getattr(config, name) is None}
    task_pays = not config.reward_fns  # no reward functions given: the task's reward pays
    return replace(
        config,
        **limits,
        reference_model=task.policy_dir if config.reference_model is None else config.reference_model,
        reward_fns=task.reward_fns if task_pays else config.reward_fns,
        reward_model=task.reward_model_dir if config.reward_model is None and task_pays else config.reward_model,
        accuracy_term=task.accuracy if config.accuracy_term is None and task_pays else config.accuracy_term,
        interaction=task.interaction if config.interaction is None else config.interaction,
    )


class TokenEnvSettings(TypedDict, total=False):
    """The fields of ``TokenEnvConfig`` as the envs' keyword arguments (``gym.make("TokenRLHF-v0", **settings)``);
    each means what the field of the same name means."""

    task: TaskName | str
    reward_model: ModelLike | None
    reward_fns: RewardFnsLike
    reward_weights: Sequence[float]
    accuracy_term: str | None
    step_reward_fn: RewardFnLike | None
    prompts: Sequence[str | list[dict] | dict] | str | os.PathLike | None
    prompt_column: str
    split: str
    chat_template: bool
    max_prompt_tokens: int | None
    max_new_tokens: int | None
    prompt_truncation: PromptTruncation
    kl_coef: float
    reward_mode: RewardMode
    score_clip: float | None
    missing_eos_penalty: float | None
    temperature: float
    interaction: Interaction | type | str | None
    end_of_turn_token: int | str | None
    stop_strings: Sequence[str]
    max_turns: int | None
    max_env_tokens: int | None
    reference_model: ModelLike | None
    tokenizer: str | os.PathLike | object | None
    reward_tokenizer: str | os.PathLike | object | None
    policy: torch.nn.Module | Callable | None
    device: str | torch.device | None
    precision: Precision | None


def resolve_precision(precision: Precision | None, device: str | torch.device) -> Precision:
    """The precision ``device`` runs at: ``precision``, or when None bf16 on a GPU that has it and fp32 elsewhere.
    bf16 on a device without it raises, naming the setting."""
    device = torch.device(device)
    if precision is None:
        return "bf16" if device.type == "cuda" and bf16_supported(device) else "fp32"
    check_choice("precision", precision, Precision)
    if precision == "bf16" and not bf16_supported(device):
        where = "this CPU lacks AVX512-BF16 and AMX" if device.type == "cpu" else f"{device} lacks bf16"
        raise ValueError(
            f"precision 'bf16' (--precision bf16) needs bf16 arithmetic, and {where} (it would run emulated, "
            "slower than fp32); use --precision fp32"
        )
    return precision


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic natively: a CUDA GPU that reports it, or a CPU with AVX512-BF16 or AMX
    instructions and oneDNN to use them (oneDNN's own check also passes plain AVX512, where bf16 is emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return instructions and torch.backends.mkldnn.is_available()
    return False


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_kl_coef(value) -> float:
    """The KL coefficient as a float; a negative, non-finite or non-number value raises."""
    return check_float("kl_coef", value, ">= 0 (it scales a penalty)", lambda v: v >= 0)


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value, rule: str, holds: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value) or not holds(value):
        raise ValueError(f"{name} must be {rule} and finite, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> None:
    allowed = choices.__args__
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
