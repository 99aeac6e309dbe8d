"""The arithmetic task's tokenizer: one token per character, saved in Hugging Face format.

The vocabulary is fixed, not trained: ``<pad>`` (id 0), ``<unk>`` (id 1),
``<eos>`` (id 2), then the digits 0-9, ``+`` and ``=``. Any other character
encodes as ``<unk>``. Decoding joins the characters with nothing between them, so
``decode(encode(s)) == s`` for every prompt and answer; PAD and EOS are distinct
for the reasons given in ``textenv.default_task.tokenizer``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from textenv.default_task.tokenizer import EOS, PAD, UNK, wrap_tokenizer

CHARACTERS = "0123456789+="


def build_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """The character-level tokenizer (see the module docstring); the same for every build.

    ``characters`` (default: the arithmetic task's) get ids 3, 4, ... in order; a
    task that adds characters (``textenv.calculator``) appends them.
    """
    if len(set(characters)) != len(characters):
        raise ValueError(f"characters must be distinct, got {characters!r}")
    vocab = {token: i for i, token in enumerate([PAD, UNK, EOS, *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # every character a word; "[\s\S]", not ".", which skips newlines ("\n\n" would become one unknown token)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # join tokens without spaces
    tokenizer.add_special_tokens([PAD, UNK, EOS])
    return wrap_tokenizer(tokenizer)
