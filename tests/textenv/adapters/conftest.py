"""What the adapters' tests share: a character tokenizer that decodes exactly, tiny GPT-2s over it, a reward
model stand-in for the shared exactness check, and a driver for episodes of several turns.

The exactness helpers are the embedded tasks' own (``tests/textenv/test_core.py`` for single-turn episodes,
``tests/textenv/test_turns.py`` for several turns): every agent step's reference log-prob, policy log-prob,
KL term and reward against one plain forward over the episode's final context.
"""

import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tests.textenv.test_turns import Record, record_step

PAD, UNK, EOS = 0, 1, 2
CHARACTERS = string.printable


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character after <pad> 0, <unk> 1, <eos> 2; decoding joins the characters as they
    are (a reply decodes back to its text)."""
    vocab = {"<pad>": PAD, "<unk>": UNK, "<eos>": EOS} | {ch: i + 3 for i, ch in enumerate(CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_lm(vocab_size: int, positions: int, seed: int = 0) -> GPT2LMHeadModel:
    """A one-layer GPT-2 of width 16 over ``vocab_size`` tokens, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=positions, n_embd=16, n_layer=1, n_head=2,
            bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def lms(tokenizer):
    """(reference, policy): two tiny GPT-2s of 4096 positions with different weights."""
    return tiny_lm(len(tokenizer), 4096, seed=0), tiny_lm(len(tokenizer), 4096, seed=1)


class Scorer:
    """Stands in for a reward model in the shared exactness check: ``score(tokens)`` of the final context,
    recomputed independently, as a classifier's logits (``uncached_score`` reads ``logits[0]``)."""

    def __init__(self, score=lambda tokens: 0.0):
        self.score = score

    def __call__(self, input_ids):
        return SimpleNamespace(logits=torch.tensor([[self.score(input_ids[0].tolist())]], dtype=torch.float64))


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def context_of(observation: dict, slot: int) -> list[int]:
    return observation["input_ids"][slot][observation["attention_mask"][slot] == 1].tolist()


KEYS = ("ref_logprob", "logprob", "turn_reward", "env_tokens")


def play_vector(env, tokenizer, turn_text, steps: int, seed: int = 0) -> list[Record]:
    """Drive a vector env (NEXT_STEP autoreset) whose agent writes ``turn_text(rng)`` then EOS each turn; the
    finished episodes, recorded from what the env returned (as ``test_turns.run_vector`` records them)."""
    rng = np.random.default_rng(seed)
    observation, _ = env.reset(seed=seed)
    n = env.num_envs
    records = [Record(context_of(observation, s), len(context_of(observation, s))) for s in range(n)]
    plans = [[] for _ in range(n)]
    restarting = np.zeros(n, dtype=bool)
    finished = []
    for _ in range(steps):
        for s in range(n):
            if not plans[s]:
                plans[s] = text_ids(tokenizer, turn_text(rng)) + [EOS]
        actions = np.array([plans[s].pop(0) for s in range(n)])
        observation, rewards, terminated, truncated, info = env.step(actions)
        for s in range(n):
            if restarting[s]:
                records[s], plans[s] = Record(context_of(observation, s), len(context_of(observation, s))), []
                continue
            record_step(records[s], actions[s], rewards[s], {k: info[k][s] for k in KEYS}, context_of(observation, s))
            if terminated[s] or truncated[s]:
                records[s].ended, records[s].truncated, records[s].score = True, bool(truncated[s]), info["score"][s]
                finished.append(records[s])
        restarting = terminated | truncated
    return finished
