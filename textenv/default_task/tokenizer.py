"""A small BPE tokenizer for the review corpus, saved in Hugging Face format.

Words are split on whitespace (kept as a leading "▁", as in SentencePiece) and
punctuation, then BPE-merged; with the corpus' small vocabulary almost every word
ends up one token, so an action of the env is, to the eye, the next word.

Special tokens: ``<pad>`` (id 0), ``<unk>`` (id 1), ``<eos>`` (id 2). PAD and EOS
are distinct on purpose: a model whose PAD is its EOS cannot learn to stop, and
masks built from PAD silently drop the real EOS.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts`` and wrap it for ``transformers`` (see ``wrap_tokenizer``)."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """``tokenizer`` (whose vocabulary holds ``<pad>``, ``<unk>``, ``<eos>``) as a ``transformers`` tokenizer.

    Prompts are padded on the left (generation appends on the right), and
    ``encode`` adds no special tokens: callers append ``eos_token_id`` themselves.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
