"""Text is text: prompts, messages, replies and responses never become control tokens by their spelling.

A tokenizer's *control tokens* are the tokens that structure a sequence rather than
spell text: its special tokens (BOS, EOS, PAD, ..., and every added token flagged
special), the added tokens its chat template writes literally (Llama 3's
``<|start_header_id|>``, even when they were added as plain added tokens), and the
added tokens spelled like markup (``<...>``, ``[...]``). Added tokens that spell text
(a run of spaces, a word) are ordinary tokens.

- ``encode_text``: a text tokenized as characters: a control token's spelling in it
  becomes the ordinary tokens of those characters, while the tokenizer's own special
  tokens (its BOS, a classifier's [CLS]) are still added as it adds them. Plain
  prompts, interaction replies and what a reward model with its own tokenizer reads
  all go through it.
- ``control_text_in``: the control tokens whose spelling a text contains. A chat
  message that contains one is refused (the chat template would turn it into that
  token and could open a turn of another role); a policy's reply read in a reward
  model's chat template is tokenized as text instead (``encode_chat``).
"""

from __future__ import annotations

import copy
import re
import weakref
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

MARKUP = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")  # <|im_start|>, </s>, <think>, [INST]


def _template_source(tokenizer: PreTrainedTokenizerBase) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return " ".join(template.values()) if isinstance(template, dict) else str(template)


def _find_control_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    found = {token for token in tokenizer.all_special_tokens if token}
    template = _template_source(tokenizer)
    for added in tokenizer.added_tokens_decoder.values():
        content = added.content
        if not content.strip():
            continue  # whitespace spells text
        if added.special or MARKUP.fullmatch(content.strip()) or content in template:
            found.add(content)
    return tuple(sorted(found, key=lambda t: (-len(t), t)))


class _TextView:
    """What this module knows of one tokenizer: its control tokens, and a copy of it whose control tokens are all
    flagged special, so that ``split_special_tokens`` splits every one of them (a fast tokenizer splits only the
    tokens flagged special; a Python tokenizer splits every added token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, key: tuple):
        self.key = key
        self.controls = _find_control_tokens(tokenizer)
        self.text_only = tokenizer
        controls = set(self.controls)
        plain = [t for t in tokenizer.added_tokens_decoder.values() if t.content in controls and not t.special]
        if getattr(tokenizer, "backend_tokenizer", None) is not None and plain:
            from tokenizers import AddedToken

            self.text_only = copy.deepcopy(tokenizer)
            self.text_only.backend_tokenizer.add_special_tokens(
                [
                    AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, special=True)
                    for t in plain
                ]
            )


_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _view(tokenizer: PreTrainedTokenizerBase) -> _TextView:
    key = (len(tokenizer), _template_source(tokenizer), tuple(tokenizer.all_special_tokens))
    try:
        view = _VIEWS.get(tokenizer)
    except TypeError:  # not weakly referenceable: no cache
        return _TextView(tokenizer, key)
    if view is None or view.key != key:  # new, or tokens were added or the template changed since
        view = _VIEWS[tokenizer] = _TextView(tokenizer, key)
    return view


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The spellings of the tokenizer's control tokens (see the module docstring), longest first."""
    return _view(tokenizer).controls


def control_text_in(text: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The control tokens whose spelling occurs in ``text``, longest first."""
    return [token for token in control_tokens(tokenizer) if token in text]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    """``text``'s token ids with every control token's spelling tokenized as its characters; with
    ``add_special_tokens`` the tokenizer's own special tokens (BOS, [CLS], ...) are added as it adds them."""
    encoded = _view(tokenizer).text_only(text, split_special_tokens=True, add_special_tokens=add_special_tokens)
    return list(encoded["input_ids"])


def special_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it adds its special tokens (BOS; [CLS], EOS)."""
    probe = "a"
    framed = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(framed) - len(bare) + 1):
        if framed[start : start + len(bare)] == bare:
            return framed[:start], framed[start + len(bare) :]
    return [], []


REPLY_MARK = "\ue000textenv-reply\ue000"  # a private-use character: no tokenizer's template or text writes it


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], reply: str) -> list[int]:
    """``messages`` and the assistant's ``reply`` in the tokenizer's chat template, tokenized with its special
    tokens; the messages must be free of control text (``control_text_in``). A reply that spells a control token
    is tokenized as text between the template's own tokens: it cannot close its turn or open another."""
    conversation = [*messages, {"role": "assistant", "content": reply}]
    if not control_text_in(reply, tokenizer):
        return list(tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False))["input_ids"])
    marked = [*messages, {"role": "assistant", "content": REPLY_MARK}]
    parts = tokenizer.apply_chat_template(marked, tokenize=False).split(REPLY_MARK)
    if len(parts) != 2:  # the template dropped or repeated the reply: read it without its control text
        for token in control_text_in(reply, tokenizer):
            reply = reply.replace(token, "")
        conversation[-1] = {"role": "assistant", "content": reply}
        return list(tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False))["input_ids"])
    head, tail = special_frame(tokenizer)
    before, after = (list(tokenizer(part, add_special_tokens=False)["input_ids"]) for part in parts)
    return head + before + encode_text(tokenizer, reply, add_special_tokens=False) + after + tail
