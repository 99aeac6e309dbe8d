"""The agent: an actor-critic on a Hugging Face causal LM.

The LM head is the actor (logits over the vocabulary); a value head, a linear map
of the last hidden state initialised to output 0, is the critic. With
``share_backbone=True`` (the default) one forward of the LM gives both. With
``share_backbone=False`` the critic runs its own trunk: Stiennon et al. (2020)
initialise it from the reward model, and "The 37 implementation details of PPO"
(item 12) found separate networks stronger.

The rollout samples from the logits with ``textenv.lm.sample_tokens`` (stepping the
agent with ``textenv.lm.CachedStepper``); the update re-scores whole episodes with
one teacher-forced forward (``agents.ppo.score_rollout``), asking for the logits only
at the positions that predict an action (``logits_at``): never over the prompt or
padding, where the LM head (vocabulary x width) would be most of a small model's work.
That forward may pack several episodes into one row (``agents.packing``): then it gets
no attention mask, and position ids that restart at 0 for each episode.

GPT-2's ``gelu_new`` (transformers' ``NewGELUActivation``, six tensor ops in Python)
is swapped for torch's fused ``gelu(approximate="tanh")``: the same formula, equal in
float32 to within 1.2e-7 x max(1, |x|), each as close to the float64 formula as the other
(``tests/agents/test_fast_paths.py``); forward and backward of the default task run 11%
faster. The saved model keeps its config; a reloaded agent is
swapped again.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.activations import NewGELUActivation

from textenv.lm import cache_keyword, disable_dropout, output_cache

VALUE_HEAD_FILE = "value_head.safetensors"
CRITIC_DIR = "critic"


def value_head(hidden_size: int) -> nn.Linear:
    """The critic's head: a linear map of the last hidden state to V(s), zero at the start.

    Zero-initialised, so the first advantages are the returns themselves rather than
    the noise of a random head.
    """
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def save_value_head(head: nn.Linear, directory: str | os.PathLike) -> None:
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, Path(directory) / VALUE_HEAD_FILE
    )


def load_value_head(head: nn.Linear, directory: str | os.PathLike) -> None:
    head.load_state_dict(load_file(Path(directory) / VALUE_HEAD_FILE))


class TanhGELU(nn.Module):
    """``gelu_new`` as torch's fused kernel: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_gelu(model: nn.Module) -> int:
    """Replace every ``NewGELUActivation`` in ``model`` by ``TanhGELU``; returns how many were replaced."""
    swaps = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is NewGELUActivation
    ]
    for parent, name in swaps:
        setattr(parent, name, TanhGELU())
    return len(swaps)


class _RowsIntoGradient(torch.autograd.Function):
    """An embedding lookup whose backward adds the looked-up rows' gradients into ``weight.grad`` itself.

    Autograd's own backward of a lookup is a dense (vocabulary x width) tensor, zeros but for
    the rows looked up, which is then added to the gradient the tied LM head gives the same
    matrix: two passes over a vocabulary-sized matrix for a few hundred rows. This adds the
    rows in place and gives autograd no gradient for the weight on this path.
    """

    @staticmethod
    def forward(ctx, ids: Tensor, anchor: Tensor, module: nn.Embedding) -> Tensor:
        # the weight comes inside its module, not as an input: an edge to it would hold back the LM head's gradient
        # (autograd accumulates a leaf's gradient once every edge into it has run), so this backward would find
        # no .grad to add to; the empty ``anchor`` is what makes the output need a backward
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = module.weight, module.padding_idx
        return F.embedding(ids, module.weight, module.padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        weight, ids, rows = ctx.weight, ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        # repeated ids summed first, in order, as autograd's dense backward sums them: the same numbers to the bit
        unique, inverse = torch.unique(ids, return_inverse=True)
        sums = rows.new_zeros(len(unique), rows.shape[1]).index_add_(0, inverse, rows)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, unique, sums.to(weight.grad.dtype))
        return None, None, None


def _rows_into_gradient(module: nn.Embedding, args: tuple, output: Tensor) -> Tensor | None:
    weight = module.weight
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (torch.is_grad_enabled() and weight.requires_grad) or distributed:
        return None  # nothing to train, or DDP/FSDP, which reduce or shard the gradient autograd accumulates
    anchor = torch.empty(0, device=weight.device, requires_grad=True)
    return _RowsIntoGradient.apply(args[0], anchor, module)


def add_embedding_rows_in_place(model: PreTrainedModel) -> bool:
    """Give a tied input embedding (a plain ``nn.Embedding``) the in-place backward of ``_RowsIntoGradient``.

    Returns whether it did. The gradient is autograd's to the bit for one backward (repeated
    ids are summed first, in order), to float rounding when micro-batches accumulate. At
    GPT-2-small size (vocabulary 50,257) a micro-batch's backward on one CPU thread took
    1.00 s against 1.13 s, and a vocabulary-sized temporary less.
    Not done for embeddings that scale or renormalise (a subclass, ``max_norm``,
    ``scale_grad_by_freq``, ``sparse``) nor for untied ones (no dense sum to save); under
    DDP or FSDP, and without gradients, the lookup is autograd's own.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain = type(embedding) is nn.Embedding and embedding.max_norm is None
    plain = plain and not embedding.scale_grad_by_freq and not embedding.sparse
    if not plain or head is None or head.weight is not embedding.weight:
        return False
    if _rows_into_gradient not in embedding._forward_hooks.values():  # a policy wrapped twice keeps one hook
        embedding.register_forward_hook(_rows_into_gradient)
    return True


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether a causal LM's forward takes ``logits_to_keep`` (transformers' models do; a PEFT model passes it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class ActorCriticOutput(NamedTuple):
    logits: Tensor  # (B, T, V); with logits_at: (N, V), the N True positions in row-major order
    values: Tensor  # (B, T)
    past_key_values: tuple | None  # (policy cache, critic cache or None)


class ActorCritic(nn.Module):
    def __init__(self, policy: PreTrainedModel, critic: PreTrainedModel | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = value_head((critic or policy).config.hidden_size)
        self._logits_to_keep = accepts_logits_to_keep(policy)

    def prepared(self) -> ActorCritic:
        """This agent as the builders return it: dropout off, GELU fused, tied embedding rows added in place."""
        disable_dropout(self)
        fuse_gelu(self)
        add_embedding_rows_in_place(self.policy)
        return self

    @property
    def share_backbone(self) -> bool:
        return self.critic is None

    @classmethod
    def from_models(
        cls,
        policy: str | os.PathLike | nn.Module,
        share_backbone: bool = True,
        critic_init: str | os.PathLike | PreTrainedModel | None = None,
    ) -> ActorCritic:
        """Wrap ``policy`` (a causal LM or its directory); a separate critic trunk starts from ``critic_init``.

        ``critic_init`` is the reward model's directory or module when it shares the
        policy's tokenizer (the Stiennon et al. choice), else None: the policy's trunk.
        """
        if not isinstance(policy, nn.Module):
            policy = AutoModelForCausalLM.from_pretrained(policy)
        critic = None
        if not share_backbone:
            source = critic_init if critic_init is not None else policy
            if isinstance(source, PreTrainedModel):
                critic = AutoModel.from_config(source.config)
                critic.load_state_dict(source.base_model.state_dict())
            else:
                critic = AutoModel.from_pretrained(source)
        return cls(policy, critic).prepared()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        past_key_values: tuple | None = None,
        use_cache: bool = False,
        logits_at: Tensor | None = None,
    ) -> ActorCriticOutput:
        """Logits and values at every position of ``input_ids`` (B, T), from one forward per trunk.

        Called like a Hugging Face causal LM, so ``textenv.lm.CachedStepper`` steps it;
        its cache is the pair (policy cache, critic cache or None). ``logits_at``, a
        boolean (B, T): the LM head runs only at its True positions and the logits come
        back as (N, V), N the number of True entries, in row-major order (values stay (B, T)).
        """
        cache = past_key_values
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        keep = {"logits_to_keep": logits_at} if logits_at is not None and self._logits_to_keep else {}
        out = self.policy(
            input_ids=input_ids,
            output_hidden_states=self.share_backbone,
            **{cache_keyword(self.policy): None if cache is None else cache[0]},
            **inputs,
            **keep,
        )
        logits = out.logits if logits_at is None or keep else out.logits[logits_at]
        critic_cache = None
        if self.share_backbone:
            hidden = out.hidden_states[-1]
        else:
            critic_cache = None if cache is None else cache[1]
            critic_out = self.critic(input_ids=input_ids, **{cache_keyword(self.critic): critic_cache}, **inputs)
            hidden, critic_cache = critic_out.last_hidden_state, output_cache(critic_out)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return ActorCriticOutput(logits, values, (output_cache(out), critic_cache) if use_cache else None)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The policy as a Hugging Face model (or PEFT adapters), with the value head (and critic) beside it."""
        directory = Path(directory)
        self.policy.save_pretrained(directory)
        save_value_head(self.value_head, directory)
        if self.critic is not None:
            self.critic.save_pretrained(directory / CRITIC_DIR)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ActorCritic:
        directory = Path(directory)
        if (directory / "adapter_config.json").is_file():  # LoRA: adapters over the base they name
            from peft import AutoPeftModelForCausalLM

            policy = AutoPeftModelForCausalLM.from_pretrained(directory, is_trainable=True)
        else:
            policy = AutoModelForCausalLM.from_pretrained(directory)
        critic = AutoModel.from_pretrained(directory / CRITIC_DIR) if (directory / CRITIC_DIR).is_dir() else None
        agent = cls(policy, critic)
        load_value_head(agent.value_head, directory)
        return agent.prepared()
