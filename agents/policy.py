"""The agent: an actor-critic on a Hugging Face causal LM.

The LM head is the actor (logits over the vocabulary); a value head, a linear map
of a hidden state initialised to output 0, is the critic. With
``share_backbone=True`` (the default) one forward of the LM gives both; the value
head reads the output of the trunk's middle block (``value_layer``), not its last
hidden state, which the next-token prediction owns (``docs/design.md``). With
``share_backbone=False`` the critic runs its own trunk and the head reads that trunk's
last hidden state: Stiennon et al. (2020) initialise it from the reward model, and
"The 37 implementation details of PPO" (item 12) found separate networks stronger.

The rollout samples from the logits with ``textenv.lm.sample_tokens`` (stepping the
agent with ``textenv.lm.CachedStepper``); the update re-scores whole episodes with
one teacher-forced forward (``agents.ppo.score_rollout``), asking for the logits only
at the positions that predict an action (``logits_at``): never over the prompt or
padding, where the LM head (vocabulary x width) would be most of a small model's work.
That forward may pack several episodes into one row (``agents.packing``): then it gets
no attention mask, and position ids that restart at 0 for each episode.

A model handed to the agent (``from_models(model)``) is changed in one way only: its
dropout is turned off. No module is swapped and no hook is registered. The speed paths
(``docs/departures.md`` lists every departure, with its gain and its test):

- a model the agent loads itself (``load_policy``; every critic trunk it builds) runs
  GPT-2's ``gelu_new`` as ``gelu_pytorch_tanh``, transformers' name for torch's fused
  ``gelu(approximate="tanh")``: the same formula, equal in float32 to within
  1.2e-7 x max(1, |x|), set as a config override, so a saved agent's config names the
  activation its weights were trained with;
- ``forward(..., sparse_embedding_grad=True)``, which the update asks for: the lookup of a
  tied input embedding adds the looked-up rows into the LM head's gradient of the same
  matrix in place (``SparseRowsLookup``, with the head run as ``TiedHead`` for that one
  call), where autograd would build a vocabulary-sized dense gradient for the lookup and
  add the two out of place. The same gradient to the bit, two vocabulary-sized
  temporaries less;
- on the CPU in float32, a plain LM head's logits are computed in vocabulary blocks
  (``textenv.vocabulary``; the head's ``forward`` replaced for the call only): the same
  floats, faster.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from textenv.config import Precision, resolve_precision
from textenv.lm import cache_keyword, disable_dropout, output_cache
from textenv.vocabulary import blocked_head, head_forward, plain_head, vocabulary_head, vocabulary_linear

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_LAYER_KEY = "value_layer"
PRIOR_WEIGHT_KEY = "prior_weight"  # the value prior's weight, a tensor of the head's file where the critic has one
CRITIC_DIR = "critic"


def value_head(hidden_size: int) -> nn.Linear:
    """The critic's head: a linear map of a hidden state to V(s), zero at the start.

    Zero-initialised, so the first advantages are the returns themselves rather than
    the noise of a random head.
    """
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def save_value_head(
    head: nn.Linear, directory: str | os.PathLike, value_layer: int | None = None, prior_weight: Tensor | None = None
) -> None:
    """The head's weights (and the value prior's weight, where given), and the block it reads (``value_layer``) in
    the file's metadata where given."""
    metadata = None if value_layer is None else {VALUE_LAYER_KEY: str(value_layer)}
    tensors = dict(head.state_dict()) | ({} if prior_weight is None else {PRIOR_WEIGHT_KEY: prior_weight})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, Path(directory) / VALUE_HEAD_FILE, metadata=metadata)


def load_value_head(head: nn.Linear, directory: str | os.PathLike) -> Tensor | None:
    """Load the head's weights; returns the value prior's weight saved beside them, None where there is none."""
    tensors = load_file(Path(directory) / VALUE_HEAD_FILE)
    prior_weight = tensors.pop(PRIOR_WEIGHT_KEY, None)
    head.load_state_dict(tensors)
    return prior_weight


def saved_value_layer(directory: str | os.PathLike) -> int | None:
    """The block a saved value head reads (its file's metadata); None for a head saved without one, which read the
    trunk's last hidden state."""
    with safe_open(Path(directory) / VALUE_HEAD_FILE, framework="pt") as saved:
        value = (saved.metadata() or {}).get(VALUE_LAYER_KEY)
    if value is not None and not value.isdigit():
        raise ValueError(f"{Path(directory) / VALUE_HEAD_FILE}: its {VALUE_LAYER_KEY!r} is {value!r}, not a block")
    return None if value is None else int(value)


def trunk_layers(model: PreTrainedModel) -> int:
    """The number of transformer blocks of ``model``'s (text) trunk."""
    return model.config.get_text_config().num_hidden_layers


def middle_layer(layers: int) -> int:
    """The block a value head reads on a shared trunk by default: the middle one, ceil(layers / 2)."""
    return (layers + 1) // 2


def check_value_layer(value_layer: int | None, policy: PreTrainedModel, shared: bool) -> int | None:
    """``value_layer`` resolved (None: the middle block of a shared trunk; stays None for a separate critic)."""
    if not shared:
        if value_layer is not None:
            raise ValueError(
                f"value_layer={value_layer!r} is for a value head on the policy's trunk (share_backbone=True); a "
                "separate critic's head reads its own trunk's last hidden state: leave value_layer None"
            )
        return None
    layers = trunk_layers(policy)
    if value_layer is None:
        return middle_layer(layers)
    if isinstance(value_layer, bool) or not isinstance(value_layer, int) or not 1 <= value_layer <= layers:
        raise ValueError(
            f"value_layer={value_layer!r} is not a block of the policy's trunk, which has {layers}: pass 1 .. "
            f"{layers} ({layers}: its last hidden state; None: the middle block, {middle_layer(layers)})"
        )
    return value_layer


FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}
"""Activation names a config may hold, and transformers' name for torch's fused kernel of the same formula."""


def fused_activations(config: PretrainedConfig) -> dict[str, str]:
    """The config overrides that run ``config``'s activations as torch's fused kernels; empty if none applies."""
    fields = ("activation_function", "hidden_act")  # GPT-2, GPT-J, CodeGen name it the first way; most others
    return {
        name: FUSED_ACTIVATIONS[value] for name in fields if (value := getattr(config, name, None)) in FUSED_ACTIVATIONS
    }


def load_for_training(auto_class, source: str | os.PathLike, **kwargs):
    """``auto_class.from_pretrained(source, **kwargs)`` as the agent trains it: activations fused, weights in float32
    whatever dtype the checkpoint was saved in (the master weights; bf16 is autocast's, per forward)."""
    fused = fused_activations(AutoConfig.from_pretrained(source))
    return auto_class.from_pretrained(source, dtype=torch.float32, **fused, **kwargs)


def load_policy(source: str | os.PathLike) -> PreTrainedModel:
    """The causal LM in a directory (or of a hub name), loaded for the agent to train (``load_for_training``)."""
    return load_for_training(AutoModelForCausalLM, source)


class _NoLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def load_trunk(source: str | os.PathLike) -> PreTrainedModel:
    """The trunk of the model saved in ``source`` (``load_for_training``), every one of its weights from there.

    A reward model's directory holds its head too, which the trunk leaves out: transformers' load report of that
    head is not shown. A weight of the trunk the checkpoint lacks is refused (it would start random)."""
    logger = hf_logging.get_logger("transformers.modeling_utils")
    no_report = _NoLoadReport()  # a filter, not a level: transformers runs other checks at some levels
    logger.addFilter(no_report)
    try:
        trunk, info = load_for_training(AutoModel, source, output_loading_info=True)
    finally:
        logger.removeFilter(no_report)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"the critic's trunk from {os.fspath(source)!r}: the checkpoint has no {', '.join(missing[:4])}"
            f"{f' (and {len(missing) - 4} more)' if len(missing) > 4 else ''}; a trunk needs all of its weights from "
            "the model it starts from: pass a complete checkpoint of the policy's architecture"
        )
    return trunk


def critic_trunk(source: str | os.PathLike | PreTrainedModel) -> PreTrainedModel:
    """A new trunk (no head) with the weights of ``source`` (a directory, hub name or model, left as it is);
    activations fused."""
    if hasattr(source, "get_base_model"):  # PEFT: its modules hold adapters beside the weights they adapt
        raise ValueError(
            "a critic trunk cannot start from a PEFT model (critic_init, else the policy): its modules hold "
            "adapters a trunk has no place for; pass critic_init= the base model, or its directory"
        )
    if not isinstance(source, PreTrainedModel):
        return load_trunk(source)
    config = copy.deepcopy(source.config)
    for name, value in fused_activations(config).items():
        setattr(config, name, value)
    trunk = AutoModel.from_config(config)
    trunk.load_state_dict(source.base_model.state_dict())
    return trunk


def agent_autocast(precision: Precision | None, device: torch.device) -> torch.autocast | None:
    """What the agent's forwards (rollout, update, evaluation) run under at ``precision`` (None: the device's
    default, ``textenv.config.resolve_precision``): bf16 autocast (matrix products in bf16 from fp32 weights, which
    stay the master copy, as Adam's moments do), or None for fp32."""
    if resolve_precision(precision, device) == "fp32":
        return None
    return torch.autocast(device.type, dtype=torch.bfloat16)


class TiedGradient:
    """Where the tied LM head's weight gradient waits, from the head's backward (``TiedHead``) until the input
    lookup's (``SparseRowsLookup``, which runs later: the embedding is the first operation of the forward) adds
    its rows to it in place. One per forward."""

    def __init__(self):
        self.head: Tensor | None = None


class TiedHead(torch.autograd.Function):
    """``F.linear(x, weight)`` for a tied LM head, whose weight gradient goes to ``slot`` rather than to autograd.

    The lookup of the same matrix (``SparseRowsLookup``) returns it, its own rows added, as the whole
    weight's gradient: autograd then has one gradient for the matrix and no sum to make. (It adds a
    sparse gradient to a dense one out of place in torch 2.13, a copy of the vocabulary x width matrix;
    nor does it add two dense ones in place when one is a view, as the head's gradient is.) The same
    products as autograd's backward of ``F.linear``, in autocast's dtype where the forward ran under
    autocast: the same gradients to the bit.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, slot: TiedGradient) -> Tensor:
        device = x.device.type
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.slot = slot
        ctx.save_for_backward(x, weight)
        return vocabulary_linear(x, weight)  # F.linear's floats, in vocabulary blocks on the CPU

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        master = weight.dtype  # the weight's own dtype, which its gradient takes
        if ctx.dtype is not None:  # what autocast's F.linear multiplied: both operands cast
            x, weight = x.to(ctx.dtype), weight.to(ctx.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = rows.mm(weight).view(x.shape) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            head = rows.t().mm(x.reshape(-1, x.shape[-1])).to(master)
            ctx.slot.head = head if ctx.slot.head is None else ctx.slot.head.add_(head)
        return grad_x, None, None


class SparseRowsLookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose weight gradient is the looked-up rows, added to the tied LM
    head's gradient in place.

    Autograd's own backward of a lookup is a dense (vocabulary x width) tensor, zeros but for
    the rows looked up, which autograd then adds to the tied LM head's dense gradient of the same
    matrix: passes over a vocabulary-sized matrix for a few hundred rows. Here the rows are summed
    (repeated ids in order, as the dense backward sums them) and added into the head's gradient that
    ``TiedHead`` left in ``slot``, which becomes the weight's gradient: the same gradient to the bit.
    Where the head did not leave one (a loss without the logits; a head ``TiedHead`` does not run), the
    gradient is the rows as a sparse tensor, which autograd adds to any other. ``torch.autograd.grad``
    sees the summed, dense gradient either way.
    """

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None, slot: TiedGradient) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.shape, ctx.slot = padding_idx, weight.shape, slot
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        unique, inverse = torch.unique(ids, return_inverse=True)  # sorted and distinct: a coalesced tensor's indices
        sums = rows.new_zeros(len(unique), rows.shape[1]).index_add_(0, inverse, rows)
        head, ctx.slot.head = ctx.slot.head, None
        if head is not None:
            return None, head.index_add_(0, unique, sums.to(head.dtype)), None, None
        weight_grad = torch.sparse_coo_tensor(unique[None], sums, ctx.shape, is_coalesced=True, check_invariants=False)
        return None, weight_grad, None, None


def tied_head(model: nn.Module, slot: TiedGradient) -> AbstractContextManager[None]:
    """For the duration of a forward, ``model``'s LM head runs as ``TiedHead`` with ``slot``, where it is a plain
    ``nn.Linear`` without bias (others run as they are: the lookup's gradient is then sparse rows), through
    ``textenv.vocabulary.head_forward``: nothing stays changed."""
    head = plain_head(model)
    return head_forward(head, lambda x: TiedHead.apply(x, head.weight, slot))


def sparse_lookup_applies(model: nn.Module) -> bool:
    """Whether ``model``'s input embedding may look up through ``SparseRowsLookup``: a plain, trained, tied one.

    Not for embeddings that scale or renormalise (a subclass, ``max_norm``,
    ``scale_grad_by_freq``) or are sparse already, nor for frozen ones, nor for untied ones
    (no dense gradient for the rows to land in: the weight's gradient would stay sparse).
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    plain = type(embedding) is nn.Embedding and embedding.max_norm is None
    plain = plain and not embedding.scale_grad_by_freq and not embedding.sparse
    return plain and embedding.weight.requires_grad and head is not None and head.weight is embedding.weight


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
    """The actor (``policy``, a causal LM) and the critic (``value_head`` on the policy's trunk, or on ``critic``).

    ``value_layer``, on the policy's trunk only: the block (1 .. the trunk's layers) whose output the value head
    reads; the last is the trunk's final hidden state, after its final norm. None: the middle block
    (``middle_layer``). A separate critic's head reads its own trunk's last hidden state.

    ``value_prior``: the critic's value is the head's output plus ``prior_weight`` (a trained scalar, 1 at the
    start) times the reward model's score of the state's prefix, V(s) = head(h(s)) + w * score(s): the critic
    starts from the reward model's judgement and learns the rest. The rollout reads those scores from the env
    (``agents.rollout.collect_rollout``) and ``agents.ppo.score_rollout`` adds them; ``forward``'s values are the
    head's alone. ``docs/design.md`` says why.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        critic: PreTrainedModel | None = None,
        value_layer: int | None = None,
        value_prior: bool = False,
    ):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_layer = check_value_layer(value_layer, policy, critic is None)
        self.value_head = value_head((critic or policy).config.hidden_size)
        self.prior_weight = None
        if value_prior:
            self.add_value_prior()
        self._logits_to_keep = accepts_logits_to_keep(policy)

    @property
    def value_prior(self) -> bool:
        """Whether the values add the reward model's prefix score (``prior_weight`` times it) to the head's output."""
        return self.prior_weight is not None

    def add_value_prior(self) -> None:
        """Give the critic a value prior, its weight at 1 (``value_prior``), before any training of it."""
        if self.value_prior:
            raise ValueError("this agent's critic has a value prior already")
        # shape (1,), not a scalar: FSDP shards no 0-dim parameter
        self.prior_weight = nn.Parameter(torch.ones(1, device=self.value_head.weight.device))

    @property
    def share_backbone(self) -> bool:
        return self.critic is None

    @classmethod
    def from_models(
        cls,
        policy: str | os.PathLike | nn.Module,
        share_backbone: bool = True,
        critic_init: str | os.PathLike | PreTrainedModel | None = None,
        value_layer: int | None = None,
        value_prior: bool = False,
    ) -> ActorCritic:
        """Wrap ``policy`` (a causal LM, or its directory: ``load_policy``); a separate critic trunk starts from
        ``critic_init``; ``value_layer`` and ``value_prior`` as the class says.

        ``critic_init`` is the reward model's directory or module when it shares the
        policy's tokenizer (the Stiennon et al. choice), else None: the policy's trunk.
        A model passed in is trained as it is, dropout turned off.
        """
        if not isinstance(policy, nn.Module):
            policy = load_policy(policy)
        critic = critic_trunk(critic_init if critic_init is not None else policy) if not share_backbone else None
        agent = cls(policy, critic, value_layer, value_prior)
        disable_dropout(agent)  # the rollout's and the update's forwards must agree: the first PPO ratio exactly 1
        return agent

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        past_key_values: tuple | None = None,
        use_cache: bool = False,
        logits_at: Tensor | None = None,
        sparse_embedding_grad: bool = False,
        value_prior: Tensor | None = None,
    ) -> ActorCriticOutput:
        """Logits and values at every position of ``input_ids`` (B, T), from one forward per trunk.

        Called like a Hugging Face causal LM, so ``textenv.lm.CachedStepper`` steps it;
        its cache is the pair (policy cache, critic cache or None). ``logits_at``, a
        boolean (B, T): the LM head runs only at its True positions and the logits come
        back as (N, V), N the number of True entries, in row-major order (values stay (B, T)).
        ``sparse_embedding_grad``: the policy's tied input embedding is looked up here,
        through ``SparseRowsLookup``, where ``sparse_lookup_applies`` (else it is ignored);
        for a caller that calls ``backward`` on a loss of these logits. ``value_prior`` (B, T): the reward model's
        score of each position's prefix, for a critic with a value prior: the values add ``prior_weight`` times it
        (without it they are the head's alone, as a rollout that reads no values has them).
        """
        if value_prior is not None and not self.value_prior:
            raise ValueError("value_prior was given to an agent whose critic has none: build it with value_prior=True")
        cache = past_key_values
        inputs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        keep = {"logits_to_keep": logits_at} if logits_at is not None and self._logits_to_keep else {}
        tokens, head = {"input_ids": input_ids}, blocked_head(vocabulary_head(self.policy))
        if sparse_embedding_grad and torch.is_grad_enabled() and sparse_lookup_applies(self.policy):
            embedding, slot = self.policy.get_input_embeddings(), TiedGradient()
            lookup = SparseRowsLookup.apply(input_ids, embedding.weight, embedding.padding_idx, slot)
            tokens, head = {"inputs_embeds": lookup}, tied_head(self.policy, slot)
        with head:
            out = self.policy(
                **tokens,
                output_hidden_states=self.share_backbone,
                **{cache_keyword(self.policy): None if cache is None else cache[0]},
                **inputs,
                **keep,
            )
        logits = out.logits if logits_at is None or keep else out.logits[logits_at]
        critic_cache = None
        if self.share_backbone:
            hidden = out.hidden_states[self.value_layer]  # [0] is the embeddings, [k] block k's output
        else:
            critic_cache = None if cache is None else cache[1]
            critic_out = self.critic(input_ids=input_ids, **{cache_keyword(self.critic): critic_cache}, **inputs)
            hidden, critic_cache = critic_out.last_hidden_state, output_cache(critic_out)
        with torch.autocast(hidden.device.type, enabled=False):  # V(s) in fp32: bf16 keeps 8 bits of it
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
            if value_prior is not None:
                values = values + self.prior_weight * value_prior
        return ActorCriticOutput(logits, values, (output_cache(out), critic_cache) if use_cache else None)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The policy as a Hugging Face model (or PEFT adapters), with the value head (and critic) beside it."""
        directory = Path(directory)
        self.policy.save_pretrained(directory)
        save_value_head(self.value_head, directory, self.value_layer, self.prior_weight)
        if self.critic is not None:
            self.critic.save_pretrained(directory / CRITIC_DIR)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ActorCritic:
        directory = Path(directory)
        if (directory / "adapter_config.json").is_file():  # LoRA: adapters over the base they name
            from peft import PeftConfig, PeftModel

            base = load_policy(PeftConfig.from_pretrained(directory).base_model_name_or_path)
            policy = PeftModel.from_pretrained(base, directory, is_trainable=True)
        else:
            policy = load_policy(directory)
        critic = critic_trunk(directory / CRITIC_DIR) if (directory / CRITIC_DIR).is_dir() else None
        value_layer = saved_value_layer(directory)
        if critic is None and value_layer is None:  # saved before the head could read another block: the last
            value_layer = trunk_layers(policy)
        agent = cls(policy, critic, value_layer)
        prior_weight = load_value_head(agent.value_head, directory)
        if prior_weight is not None:
            agent.add_value_prior()
            with torch.no_grad():
                agent.prior_weight.copy_(prior_weight)
        disable_dropout(agent)
        return agent
