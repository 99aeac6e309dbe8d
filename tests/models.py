"""Small models, tokenizers and envs built in code for the tests: no downloads, a few thousand parameters each.

``tiny_causal_lm(family)`` and ``tiny_reward_model(family)`` build a randomly initialised two-layer model of
each architecture family in ``FAMILIES`` over the default task's tokenizer (``<pad>`` = 0, ``<unk>`` = 1,
``<eos>`` = 2, 446 tokens). Every dropout rate the config has is set to a nonzero value, so a test that
gets exact, repeatable numbers out of one proves that dropout is off. ``uncached_*`` are the plain
recomputations the env's cached numbers are checked against: one sequence, no cache, no padding.

Several test files share the rest: ``character_tokenizer()``, ``eos_character_tokenizer()`` and ``character_vocab``
make tokenizers of one token per printable character; ``tiny_gpt2_lm``, ``tiny_gpt2_classifier`` and
``tiny_gpt2_reward_model`` are GPT-2s of one or two layers over any vocabulary; ``lockstep_vec``, ``end_episodes``,
``chat_env`` and ``zero`` build and drive envs on CPU; ``check_layout``, ``assert_same_*`` and ``step_all`` compare
what envs return.
"""

import string
from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GemmaForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3ForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)

import textenv  # noqa: F401  (registers TokenRLHF-v0)


def tiny_gpt2_config(vocab_size: int, **kwargs) -> GPT2Config:
    """A one-layer GPT-2 of width 8 over ``vocab_size`` tokens, with the default task's special ids."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=8,
        n_layer=1,
        n_head=1,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )


# ---------------------------------------------------------------- the architecture matrix

TOKENIZER_VOCAB = 446  # the default task's tokenizer
SLIDING_WINDOW = 6  # shorter than any context of the tests (prompt + response)
DROPOUT = 0.1  # every rate a config keeps: the env and the agent must turn them off

# hidden 16, 2 layers, 2 heads of 8, 1 kv head where the family has GQA, MLP 32, 128 positions
COMMON = dict(pad_token_id=0, bos_token_id=2, eos_token_id=2)
LLAMA_LIKE = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    intermediate_size=32,
    max_position_embeddings=128,
    attention_dropout=DROPOUT,
    **COMMON,
)
GEMMA_LIKE = dict(LLAMA_LIKE, query_pre_attn_scalar=8)


GPT2_LIKE = dict(
    n_embd=16,
    n_layer=2,
    n_head=2,
    n_inner=32,
    n_positions=128,
    resid_pdrop=DROPOUT,
    embd_pdrop=DROPOUT,
    attn_pdrop=DROPOUT,
    summary_first_dropout=DROPOUT,
    **COMMON,
)
GPT_NEOX_LIKE = dict(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=128,
    attention_dropout=DROPOUT,
    hidden_dropout=DROPOUT,
    classifier_dropout=DROPOUT,
    **COMMON,
)
OPT_LIKE = dict(
    hidden_size=16,
    word_embed_proj_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    ffn_dim=32,
    max_position_embeddings=128,
    dropout=DROPOUT,
    attention_dropout=DROPOUT,
    layerdrop=DROPOUT,
    **COMMON,
)


def _with(config_class, base: dict, **fixed) -> Callable[..., PretrainedConfig]:
    def build(vocab_size: int, **overrides) -> PretrainedConfig:
        return config_class(vocab_size=vocab_size, **{**base, **fixed, **overrides})

    return build


# family -> (config builder, causal LM class, sequence-classification class, default vocab size)
ARCHITECTURES: dict[str, tuple[Callable[..., PretrainedConfig], type, type, int]] = {
    "gpt2": (_with(GPT2Config, GPT2_LIKE), GPT2LMHeadModel, GPT2ForSequenceClassification, TOKENIZER_VOCAB),
    "llama": (_with(LlamaConfig, LLAMA_LIKE), LlamaForCausalLM, LlamaForSequenceClassification, TOKENIZER_VOCAB),
    # a vocabulary padded beyond the tokenizer's, as Qwen's checkpoints have
    "qwen2": (_with(Qwen2Config, LLAMA_LIKE), Qwen2ForCausalLM, Qwen2ForSequenceClassification, 512),
    "qwen3": (_with(Qwen3Config, LLAMA_LIKE), Qwen3ForCausalLM, Qwen3ForSequenceClassification, TOKENIZER_VOCAB),
    "gpt_neox": (
        _with(GPTNeoXConfig, GPT_NEOX_LIKE),
        GPTNeoXForCausalLM,
        GPTNeoXForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
    "opt": (_with(OPTConfig, OPT_LIKE), OPTForCausalLM, OPTForSequenceClassification, TOKENIZER_VOCAB),
    "gemma": (_with(GemmaConfig, GEMMA_LIKE), GemmaForCausalLM, GemmaForSequenceClassification, TOKENIZER_VOCAB),
    "gemma2": (
        _with(
            Gemma2Config,
            GEMMA_LIKE,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        ),
        Gemma2ForCausalLM,
        Gemma2ForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
    "gemma3": (
        _with(
            Gemma3TextConfig,
            GEMMA_LIKE,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        ),
        Gemma3ForCausalLM,
        Gemma3TextForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
    # Mistral's own default window (4096): longer than any context, but still a sliding-window cache
    "mistral": (
        _with(MistralConfig, LLAMA_LIKE),
        MistralForCausalLM,
        MistralForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
    "mistral_short": (
        _with(MistralConfig, LLAMA_LIKE, sliding_window=SLIDING_WINDOW),
        MistralForCausalLM,
        MistralForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
    "phi3": (
        _with(Phi3Config, LLAMA_LIKE, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT),
        Phi3ForCausalLM,
        Phi3ForSequenceClassification,
        TOKENIZER_VOCAB,
    ),
}
FAMILIES = list(ARCHITECTURES)


def tiny_config(family: str, vocab_size: int | None = None, **overrides) -> PretrainedConfig:
    """The tiny config of ``family``; ``vocab_size`` None is the family's (the tokenizer's 446; 512 for qwen2)."""
    build, _, _, default_vocab = ARCHITECTURES[family]
    return build(default_vocab if vocab_size is None else vocab_size, **overrides)


def _seeded(model_class, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def tiny_causal_lm(family: str, vocab_size: int | None = None, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised (``seed``) two-layer causal LM of ``family``, in eval mode."""
    return _seeded(ARCHITECTURES[family][1], tiny_config(family, vocab_size, **overrides), seed)


def tiny_reward_model(family: str, vocab_size: int | None = None, seed: int = 1, **overrides) -> PreTrainedModel:
    """The same family's sequence classifier with one label (every family has one), in eval mode."""
    return _seeded(ARCHITECTURES[family][2], tiny_config(family, vocab_size, num_labels=1, **overrides), seed)


# ---------------------------------------------------------------- uncached recomputation


@torch.no_grad()
def uncached_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """A plain forward over one sequence: no cache, no padding, no mask. Returns (T, V) or (1,) for a classifier."""
    return model(input_ids=torch.tensor([tokens])).logits[0]


def uncached_logprobs(model: torch.nn.Module, prompt: list[int], actions: list[int], temperature=1.0) -> np.ndarray:
    """Log-prob of each action given prompt + the actions before it, from one plain forward (float64 softmax)."""
    logits = uncached_logits(model, prompt + actions)  # (T, V)
    start = len(prompt) - 1
    logprobs = torch.log_softmax(logits[start : start + len(actions)].double() / temperature, dim=-1)
    return logprobs[torch.arange(len(actions)), torch.tensor(actions)].numpy()


def uncached_score(reward_model: torch.nn.Module, tokens: list[int]) -> float:
    """A sequence classifier's scalar for one sequence, from one plain forward."""
    return float(uncached_logits(reward_model, tokens)[0])


@dataclass
class Episode:
    """One episode as a test records it from the env, to replay through plain forwards."""

    prompt: list[int]
    actions: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    ref_logprobs: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    score: float | None = None
    terminated: bool = False
    truncated: bool = False

    @property
    def ended(self) -> bool:
        return self.terminated or self.truncated


# ---------------------------------------------------------------- tokenizers built in code


def character_vocab(*specials: str) -> dict[str, int]:
    """The given special tokens, then one token per printable character."""
    vocab = {token: i for i, token in enumerate(specials)}
    return vocab | {ch: i + len(specials) for i, ch in enumerate(string.printable)}


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, with [PAD], [UNK] and a [CLS] the tokenizer adds at the end of every text."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2}
    vocab |= {ch: i + 3 for i, ch in enumerate(string.printable)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers.processors import TemplateProcessing

    core.post_processor = TemplateProcessing(single="$A [CLS]", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]")


def eos_character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, an EOS spelled <eos>, and a [CLS] added at the end of every text."""
    core = Tokenizer(models.WordLevel(character_vocab("[PAD]", "[UNK]", "[CLS]", "<eos>"), "[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.post_processor = TemplateProcessing(single="$A [CLS]", special_tokens=[("[CLS]", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", eos_token="<eos>"
    )


# ---------------------------------------------------------------- tiny GPT-2s over any vocabulary

NO_SPECIAL_IDS = dict(bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 lies outside these vocabularies


def tiny_gpt2_lm(vocab_size: int) -> GPT2LMHeadModel:
    """A one-layer GPT-2 of width 8 over ``vocab_size`` tokens, 128 positions, in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=8, n_layer=1, n_head=1, **NO_SPECIAL_IDS)
    return GPT2LMHeadModel(config).eval()


def tiny_gpt2_classifier(vocab_size: int, pad_token_id: int) -> GPT2ForSequenceClassification:
    """A one-layer GPT-2 sequence classifier (one label) of width 16 over ``vocab_size`` tokens, in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=16, n_layer=1, n_head=2, num_labels=1, **NO_SPECIAL_IDS
    )
    config.pad_token_id = pad_token_id
    return GPT2ForSequenceClassification(config).eval()


def tiny_gpt2_reward_model(num_labels: int = 1) -> GPT2ForSequenceClassification:
    """A two-layer GPT-2 sequence classifier of width 16 over 50 tokens (pad 0), in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0, num_labels=num_labels
    )
    return GPT2ForSequenceClassification(config).eval()


# ---------------------------------------------------------------- envs

ENV_ID = "TokenRLHF-v0"


def zero(**kwargs) -> float:
    """A reward function that pays nothing: for envs that need one but test something else."""
    return 0.0


def lockstep_vec(num_envs: int = 2, **kwargs):
    """A lockstep vector env (every row resets together) on CPU, of two new tokens per episode."""
    return gym.make_vec(
        ENV_ID,
        num_envs=num_envs,
        vectorization_mode="vector_entry_point",
        autoreset_mode="Disabled",
        device="cpu",
        max_new_tokens=2,
        **kwargs,
    )


def end_episodes(env) -> tuple:
    """Reset ``env`` and end every episode with EOS: the results of that step."""
    env.reset(seed=0)
    eos = env.unwrapped.tokenizer.eos_token_id
    return env.step(np.full(env.num_envs, eos))


def real_tokens(observation) -> list[int]:
    """The tokens of an observation under its attention mask."""
    return observation["input_ids"][observation["attention_mask"] == 1].tolist()


CONVERSATIONS = [
    [{"role": "user", "content": "Review the film"}],
    [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "The plot was"}],
]


def chat_env(tokenizer, **kwargs):
    """A single env on CPU with ``tokenizer`` (give it a chat template), prompts of up to 40 tokens."""
    return gym.make("TokenRLHF-v0", tokenizer=tokenizer, max_prompt_tokens=40, max_new_tokens=4, device="cpu", **kwargs)


# ---------------------------------------------------------------- checks of what the envs return


def check_layout(obs, prompt_ids, response, pad_token_id, length):
    """An observation is ``prompt_ids`` + ``response`` at the right end of a window of ``length``, left-padded."""
    ids, mask = obs["input_ids"], obs["attention_mask"]
    n = len(prompt_ids) + len(response)
    assert ids.shape == mask.shape == (length,)
    assert mask[length - n :].tolist() == [1] * n
    assert mask[: length - n].tolist() == [0] * (length - n)
    assert ids[length - n :].tolist() == list(prompt_ids) + list(response)
    assert (ids[: length - n] == pad_token_id).all()
    if response:
        assert ids[-1] == response[-1]


def assert_same_value(a, b, where=""):
    """Equality that treats NaN as equal to NaN, for scalars, strings, None and (object) arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, where
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=where)  # NaN == NaN here
        else:
            assert a.tolist() == b.tolist(), where
    elif isinstance(a, float) and isinstance(b, float):
        assert (np.isnan(a) and np.isnan(b)) or a == b, where
    else:
        assert type(a) is type(b) and a == b, where


def assert_same_info(a: dict, b: dict, where=""):
    assert a.keys() == b.keys(), where
    for key in a:
        assert_same_value(a[key], b[key], f"{where} info[{key!r}]")


def assert_same_obs(a: dict, b: dict, where=""):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, where
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{where} obs[{key!r}]")


def assert_same(a, b, exact: bool) -> None:
    """Equal results from two envs (NaN equal to NaN); floats to float32 rounding unless ``exact``."""
    if isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, exact)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key], exact)
    elif not exact and np.asarray(a).dtype.kind == "f":
        assert np.asarray(b).dtype == np.asarray(a).dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    else:
        np.testing.assert_equal(a, b)


def step_all(envs, action):
    """Step (or, for ``action`` None, reset without a seed) every env; check their results agree."""
    results = [env.reset() if action is None else env.step(action) for env in envs]
    original, copy, second_copy = results
    assert_same(original, copy, exact=False)
    assert_same(copy, second_copy, exact=True)
    return original
