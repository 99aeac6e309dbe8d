"""An LM head's logits, computed on the CPU in blocks of the vocabulary.

An LM head multiplies hidden states (N x D) by its weight (V x D) into logits (N x V).
With V in the tens of thousands, torch's float32 product of the whole on the CPU runs
well below the rate of the same arithmetic done in blocks of ``BLOCK`` vocabulary rows,
each block's logits copied into its slice of the output while they are still in the
cache (``python benchmarks/vocabulary_blocks.py`` measures both; ``docs/departures.md``
quotes it). Each block is ``F.linear`` of the same input, and every logit is the same dot
product over D either way: the same floats as ``F.linear``, bit for bit
(``tests/textenv/test_vocabulary.py`` checks that of the installed torch, for 2 to 257
rows and contiguous, sliced, transposed and expanded inputs). The backward's products
(the hidden states' and the weight's gradients) stay torch's own: blocks do not make
them faster.

Only float32 on the CPU outside autocast is blocked; anything else (a GPU, bf16, a
vocabulary of fewer than ``2 * BLOCK`` rows, a single row of hidden states) is torch's
own product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 1024
"""Vocabulary rows per block: the fastest of 256 .. 4096 for 16 to 768 tokens at width 768."""


def blocked(x: Tensor, weight: Tensor) -> bool:
    """Whether ``x @ weight.T``, ``weight`` (V, D), is computed in blocks: float32 on the CPU, outside autocast, a
    vocabulary of at least two blocks, two rows of ``x`` or more (one row is a matrix-vector product, which blocks
    make slower)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.shape[0] >= 2 * BLOCK
        and x.numel() >= 2 * x.shape[-1]
        and not torch.is_autocast_enabled("cpu")
    )


def vocabulary_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` (no bias), ``weight`` (V, D): (..., D) -> (..., V), in blocks of vocabulary rows
    where ``blocked``: each block is ``F.linear`` of ``x`` and the block's rows, copied into its slice of the
    output while it is still in the cache. Records no graph: for no-grad code, or a ``torch.autograd.Function``'s
    forward."""
    if not blocked(x, weight):
        return F.linear(x, weight)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], BLOCK):
        out[..., start : start + BLOCK] = F.linear(x, weight[start : start + BLOCK])
    return out


class VocabularyLinear(torch.autograd.Function):
    """``F.linear(x, weight)`` for an LM head (no bias) whose forward is ``vocabulary_linear``; its backward is
    autograd's two products for ``F.linear``, unblocked (blocks do not make them faster)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return vocabulary_linear(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = rows.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def head_linear(x: Tensor, weight: Tensor) -> Tensor:
    """An LM head's ``F.linear(x, weight)``, blocked where ``blocked``: differentiable where it needs to be."""
    if not blocked(x, weight):
        return F.linear(x, weight)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return VocabularyLinear.apply(x, weight)
    return vocabulary_linear(x, weight)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """``model``'s LM head where it is a plain ``nn.Linear`` without bias whose ``forward`` nobody replaced; else
    None (a model without one, a subclass, a PEFT layer, a head with a bias)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or head.bias is not None or "forward" in vars(head):
        return None
    return head


def vocabulary_head(model: nn.Module) -> nn.Linear | None:
    """``model``'s LM head where its logits may run in blocks: a ``plain_head`` with a vocabulary of two blocks or
    more; else None. (Finding the head costs more than a small model's step: callers find it once.)"""
    head = plain_head(model)
    return head if head is not None and head.weight.shape[0] >= 2 * BLOCK else None


@contextmanager
def head_forward(head: nn.Linear | None, forward: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """For the duration of a forward, ``head`` (an LM head) computes through ``forward``: an instance attribute
    for that time, removed after, so nothing stays changed. None, or a head whose ``forward`` someone else
    replaced, runs as it is."""
    if head is None or "forward" in vars(head):
        yield
        return
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def blocked_head(head: nn.Linear | None) -> AbstractContextManager[None]:
    """For the duration of a forward, the LM head ``head`` (``vocabulary_head``'s) computes through
    ``head_linear`` where it is on the CPU (``head_forward``; None or a head elsewhere: as it is)."""
    if head is None or head.weight.device.type != "cpu":
        return head_forward(None, F.linear)
    return head_forward(head, lambda x: head_linear(x, head.weight))
