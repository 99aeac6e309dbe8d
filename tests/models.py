"""Small models built in code for the tests: no downloads, a few thousand parameters each.

``tiny_causal_lm(family)`` and ``tiny_reward_model(family)`` build a randomly initialised two-layer model of
each architecture family in ``FAMILIES`` over the default task's tokenizer (``<pad>`` = 0, ``<unk>`` = 1,
``<eos>`` = 2, 446 tokens). Every dropout rate the config has is set to a nonzero value, so a test that
gets exact, repeatable numbers out of one proves that dropout is off. ``uncached_*`` are the plain
recomputations the env's cached numbers are checked against: one sequence, no cache, no padding.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
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
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)


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
