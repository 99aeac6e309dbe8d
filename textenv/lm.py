"""Language-model plumbing shared by the env, the agents, the default task and the benchmarks.

Convention: a batch is ``input_ids`` (B, T) with ``attention_mask`` (B, T), real
tokens contiguous in each row. Position ids always come from the mask, so a row
means the same thing whether it is padded on the left or on the right.

- log-probabilities and entropy of ``logits / temperature``, and ``sample_tokens``:
  the tokens ``torch.multinomial`` draws with the same generator, without its checks
  and with faster draws of the same random numbers on the CPU;
- padding: lists of token ids to tensors, leading pad columns cropped, rows re-laid;
- ``sequence_scores``: a sequence classifier's scalar at each row's last real token; ``prefix_scores``: a causal
  one's at every position (each prefix's score), from one forward;
- ``CachedStepper``: a model stepped over N rows with one KV cache (prefill the
  prompts, then one token per step); the env's frozen models, ``sample``, the
  agent's rollout and the benchmarks all step through it. A full-attention cache
  lives in ``PreallocatedLayer`` buffers written in place, not grown by ``torch.cat``;
  a plain LM head runs in vocabulary blocks on the CPU (``textenv.vocabulary``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from textenv.vocabulary import blocked_head, vocabulary_head

# ---------------------------------------------------------------- probabilities


def logprobs_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax of ``logits / temperature`` in float32. (..., V) -> (..., V).

    Every log-prob (policy, old policy, reference) goes through here, so all of them
    describe the distribution that tokens are actually sampled from.
    """
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)  # x / 1 is x: skipped


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of ``tokens`` under ``softmax(logits / temperature)``. (..., V), (...) -> (...)."""
    return logprobs_from_logits(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last axis, in nats. (..., V) -> (...)."""
    logprobs = logprobs_from_logits(logits, temperature)
    return -(logprobs.exp() * logprobs).sum(-1)


def sample_tokens(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A token per row from the plain softmax of ``logits / temperature`` and its log-prob. (B, V) -> (B,), (B,).

    No top-k, top-p or minimum length: the log-probs describe exactly the
    distribution the tokens came from, which is what an RL learner needs.

    The tokens are the ones ``torch.multinomial(probs, 1, generator=generator)`` draws,
    bit for bit, with the generator left in the same state. For one sample multinomial
    runs an exponential race, the argmax of probs / q with q ~ Exp(1) drawn by
    ``exponential_`` (the Gumbel-max trick with exp applied); we run the same race
    without its checks of the probabilities (three passes over (B, V) and, on a GPU,
    host waits for their results: softmax output is non-negative, and a row of NaN or
    +inf logits still fails, on its NaN log-prob), with the draws of
    ``exponential_draws``. A row's first maximum wins in both (``max`` returns the
    index ``argmax`` does, three times faster on the CPU).
    """
    logprobs = logprobs_from_logits(logits, temperature)  # (B, V)
    race = logprobs.exp().div_(exponential_draws(logprobs, generator))  # (B, V) p / q
    tokens = race.max(-1, keepdim=True).indices  # (B, 1)
    chosen = logprobs.gather(-1, tokens)[:, 0]
    torch._assert_async(~chosen.isnan().any(), "sample_tokens: logits with NaN or +inf give no distribution")
    return tokens[:, 0], chosen


def exponential_draws(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exp(1) draws shaped like ``like``, the very numbers ``torch.empty_like(like).exponential_(generator)`` gives.

    On the CPU, ``exponential_`` draws a float64 uniform u per element and returns
    -log1p(-u) in ``like``'s dtype, one element at a time under the generator's lock.
    One float64 ``uniform_`` and one vectorised log1p give the same numbers and leave
    the generator in the same state, 2.5x faster over a 50,257-token vocabulary
    (``tests/textenv/test_lm.py`` checks both against ``exponential_`` and
    ``torch.multinomial``). On other devices ``exponential_`` itself (CUDA draws
    differently).
    """
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(generator=generator)
    uniform = torch.empty_like(like, dtype=torch.float64).uniform_(generator=generator)
    return torch.log1p(uniform.neg_(), out=uniform).neg_().float()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, so the rollout's and the update's forwards agree (first ratio exactly 1).

    Dropout modules get p = 0; so do dropout rates kept as numbers, in configs
    (Llama's ``attention_dropout``, OPT's ``dropout`` and ``layerdrop``) and in the
    attributes that layers copy from them at construction and pass to the kernels.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        holders = [module, getattr(module, "config", None)]
        for holder in holders:
            for name, value in list(vars(holder).items()) if holder is not None else []:
                if any(word in name for word in ("dropout", "pdrop", "layerdrop")) and isinstance(value, float):
                    setattr(holder, name, 0.0)


# ---------------------------------------------------------------- padding


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row; pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Pad token-id lists into (ids, mask) tensors of shape (B, max_len)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def first_used_column(attention_mask: Tensor) -> int:
    """Index of the first column that is a real token in some row (0 if none is): left padding before it is dead."""
    return int(attention_mask.any(0).long().argmax())


def crop_left_padding(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row: the same batch, less work."""
    first = first_used_column(attention_mask)
    return input_ids[:, first:], attention_mask[:, first:]


def to_left_padding(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the right end, so the last real token sits at index -1."""
    length = input_ids.shape[1]
    last_real = torch.where(attention_mask.bool(), torch.arange(length, device=input_ids.device), -1).amax(-1)  # (B,)
    shift = length - 1 - last_real  # how far each row moves right
    source = (torch.arange(length, device=input_ids.device) - shift[:, None]) % length  # (B, T)
    ids = input_ids.gather(1, source)
    mask = attention_mask.gather(1, source)
    return ids.masked_fill(mask == 0, pad_token_id), mask


# ---------------------------------------------------------------- sequence scores


@contextmanager
def pooling_at_last_position(model: torch.nn.Module) -> Iterator[None]:
    """Make a sequence classifier pool at index -1, even where the last real token is the PAD id.

    Hugging Face's classifiers pool at "the rightmost token that is not pad_token_id".
    Our batches are left-padded, so index -1 is always the last real token; hiding the
    pad id for the call keeps a PAD token generated as an action from being skipped.
    """
    config = model.config
    saved = config.pad_token_id
    config.pad_token_id = -1  # no token has this id
    try:
        yield
    finally:
        config.pad_token_id = saved


def check_scalar_output(logits: Tensor) -> None:
    """A reward model gives one scalar per sequence, (B, 1): its classifier has one label."""
    if logits.ndim != 2 or logits.shape[1] != 1:
        raise ValueError(
            f"the reward model must output one scalar per sequence, shape (batch, 1), but gave "
            f"{tuple(logits.shape)}; load it with AutoModelForSequenceClassification and num_labels=1"
        )


@torch.no_grad()
def sequence_scores(reward_model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One scalar per row, read by a frozen ``reward_model`` at the row's last real token. Returns (B,)."""
    return sequence_scores_with_grad(reward_model, input_ids, attention_mask)


def sequence_scores_with_grad(reward_model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``sequence_scores`` that keeps the graph, for training a reward model. Returns (B,).

    Works for any padding side: rows are re-laid to left padding first and the head
    pools at index -1 (``pooling_at_last_position``); position ids come from the mask. A
    model wrapped for data-parallel training (DistributedDataParallel's ``module``) works too.
    """
    pad = getattr(reward_model, "module", reward_model).config.pad_token_id
    ids, mask = to_left_padding(input_ids, attention_mask, pad if pad is not None else 0)
    logits = reward_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    check_scalar_output(logits)
    return logits[:, 0].float()


def has_prefix_scores(reward_model: torch.nn.Module) -> bool:
    """Whether ``prefix_scores`` can read ``reward_model``: it has a per-position score head (``score``)."""
    return isinstance(getattr(reward_model, "score", None), torch.nn.Module)


@torch.no_grad()
def prefix_scores(reward_model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The score a frozen causal ``reward_model`` gives every prefix of each row, from one forward. Returns (B, T):
    at position p, the score of the row's tokens up to p (``sequence_scores`` of that prefix); at padding, what the
    head reads there (meaningless).

    A causal classifier pools its per-position head (``score``, (B, T, 1)) at the last real token; each position's
    output depends on the tokens up to it alone, so the head's output at p is the prefix's score. Read from that
    head while the model runs (a hook for the call, removed after). Refused where the model has no such head (a
    classifier that pools before its head, as BERT's does, reads the whole text at every position).
    """
    if not has_prefix_scores(reward_model):
        raise ValueError(
            f"{type(reward_model).__name__} has no per-position score head ('score'), so its prefixes cannot be scored "
            "from one forward: use a causal reward model that scores at the last token (GPT-2, Llama, Qwen, ...)"
        )
    captured: list[Tensor] = []
    handle = reward_model.score.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with pooling_at_last_position(reward_model):
            reward_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
            )
    finally:
        handle.remove()
    per_position = captured[0] if len(captured) == 1 else None
    if per_position is None or per_position.shape != (*input_ids.shape, 1):
        shape = None if per_position is None else tuple(per_position.shape)
        raise ValueError(
            f"{type(reward_model).__name__}'s score head gave {shape}, not one scalar per position "
            f"{(*input_ids.shape, 1)}: its prefixes cannot be scored from one forward; use a causal reward model with "
            "one label that scores at the last token (GPT-2, Llama, Qwen, ...)"
        )
    return per_position[..., 0].float()


# ---------------------------------------------------------------- the cached stepper
class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's keys and values in buffers (B, H, capacity, D) allocated once, not grown per step.

    ``DynamicLayer.update`` concatenates the whole cache with the new columns on every
    step. Here ``update`` writes the new columns after the used span ``[start, end)`` and
    returns views of that span: the model gets the same shapes and the same numbers a
    ``DynamicLayer`` gives, without the copy. ``keys`` and ``values`` are those views, so
    rows edited through them are edited in the buffer. ``drop`` forgets leading columns,
    ``widen`` adds zero columns on the left. A span that would run past the buffer moves
    to a new one of twice the width it needs, so a long-running cache reallocates at
    most once every (span width) steps. Only these methods and row edits through the
    views keep the buffers in step; ``DynamicLayer``'s others (``crop``, beam search's
    reorderings) would replace the views, and ``CachedStepper`` never calls them.

    transformers' ``StaticLayer`` does not fit: it returns its whole buffer on every step
    (the model attends over every allocated column, unwritten ones masked, so the float
    sums differ from the growing cache's) and writes all rows at one shared length, with
    no way to drop or add leading columns, which per-row restarts need.
    """

    def __init__(self, keys: Tensor, values: Tensor, capacity: int):
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.start = self.end = 0
        self.key_buffer, self.value_buffer = keys[:, :, :0], values[:, :, :0]
        self._reallocate(max(capacity, keys.shape[2]), front=0)
        self.update(keys, values)

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[2]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write (B, H, T, D) new columns after the used span; returns the span's keys and values."""
        width = key_states.shape[2]
        if self.end + width > self.capacity:
            self._reallocate(max(self.capacity, 2 * (self.end - self.start + width)), front=0)
        self.key_buffer[:, :, self.end : self.end + width] = key_states
        self.value_buffer[:, :, self.end : self.end + width] = value_states
        self.end += width
        return self._view()

    def drop(self, columns: int) -> None:
        """Forget the span's first ``columns`` columns."""
        self.start += columns
        self._view()

    def widen(self, columns: int) -> None:
        """Add ``columns`` zero columns before the span."""
        if columns > self.start:
            self._reallocate(max(self.capacity, 2 * (self.end - self.start + columns)), front=columns)
            return
        self.start -= columns
        self.key_buffer[:, :, self.start : self.start + columns] = 0
        self.value_buffer[:, :, self.start : self.start + columns] = 0
        self._view()

    def _reallocate(self, capacity: int, front: int) -> None:
        """New buffers of ``capacity`` columns: ``front`` zero columns, then the span."""
        keys, values = self.key_buffer[:, :, self.start : self.end], self.value_buffer[:, :, self.start : self.end]
        self.key_buffer = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self.value_buffer = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self.key_buffer[:, :, :front] = 0
        self.value_buffer[:, :, :front] = 0
        self.start, self.end = 0, front + keys.shape[2]
        self.key_buffer[:, :, front : self.end] = keys
        self.value_buffer[:, :, front : self.end] = values
        self._view()

    def _view(self) -> tuple[Tensor, Tensor]:
        self.keys = self.key_buffer[:, :, self.start : self.end]
        self.values = self.value_buffer[:, :, self.start : self.end]
        return self.keys, self.values


def cache_keyword(model: torch.nn.Module) -> str:
    """The name of a model's KV-cache argument: ``cache`` since transformers 5.24, ``past_key_values`` before
    (and in this project's actor-critic). A PEFT model or a wrapper with ``get_base_model`` is read through it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        parameters = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name (``cache`` or ``past_key_values``)."""
    if isinstance(out, Mapping):  # a transformers ModelOutput: a dict of the fields that are set. Its keys are
        # listed, not asked for: from 5.24 both `in` and the attribute map the old name and log a deprecation
        keys = list(out.keys())
        return next((out[key] for key in ("cache", "past_key_values") if key in keys), None)
    return getattr(out, "past_key_values", None)


EDITABLE_LAYERS = (DynamicLayer, PreallocatedLayer)
"""The cache layers ``CachedStepper`` edits row by row: full attention, every position kept."""


class CachedStepper:
    """A model stepped over N rows with one KV cache: prefill left-padded prompts, then one token per step.

    ``model`` is called like a Hugging Face model (``input_ids``, ``attention_mask``,
    ``position_ids``, ``cache`` or ``past_key_values``, ``use_cache``) and returns
    ``logits`` and its cache: a causal LM, the agent's actor-critic, or a sequence
    classifier (``scores=True``). ``last`` holds each row's output at its latest
    position: next-token logits (N, V), or the score (N,) of a classifier.

    Rows that are not ``live`` in a step get a masked pad token and keep their
    ``last``. ``start_rows`` puts new prompts into some rows while the others go on
    (the env's per-slot resets). Two strategies, chosen by the cache's layers:

    - full attention (every layer a ``DynamicLayer``, as in GPT-2, Llama, Qwen): the
      new rows are run on their own and written into the shared cache, left-padded
      to its width, and leading columns no row attends to any more are dropped, so
      the cache is never longer than the longest live context. After each prefill
      the layers become ``PreallocatedLayer``s, buffers of the prompts' width plus
      ``room`` columns written in place (``preallocate=False`` keeps the growing
      ``DynamicLayer``s, one ``torch.cat`` of the cache per layer and step): the
      same views, so the same floats;
    - any other layer (sliding-window layers that have dropped positions, models
      that mix sliding and full layers such as Gemma 2/3 and Mistral, linear
      attention): such a cache cannot be edited row by row, so every row is
      recomputed from its tokens (``contexts``). That costs one prefill of the
      batch per restart, and is exact for every cache type transformers builds.
      A row that sits out a step gets a masked column, which in a sliding window
      would take the place of a real token: the env rebuilds such a cache after a
      step in which a row waited and will go on (``rebuild``). These caches stay
      transformers' own (growing) layers.

    A model whose cache is not a ``DynamicCache`` is refused by ``check_cache``. Stepping
    never records a graph (the update re-scores episodes with gradients): the cache's
    buffers are written in place.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad_token_id: int,
        scores: bool = False,
        room: int | None = None,
        preallocate: bool = True,
    ):
        """``room``: cache columns allocated past the prompts at each prefill, for the tokens to come (the
        episode's ``max_new_tokens`` when the caller knows it; None: as many as the prompts' width). A cache
        that needs more moves once to a buffer of twice the width it needs."""
        self.model, self.pad_token_id, self.scores = model, pad_token_id, scores
        self.room, self.preallocate = room, preallocate
        self.device = next(model.parameters()).device
        self.cache_keyword = cache_keyword(model)
        self.head = None if scores else vocabulary_head(model)  # an LM head whose logits run in vocabulary blocks
        self.cache, self._editable = None, False
        self.mask: Tensor | None = None  # (N, C) which cache positions are real tokens
        self.position: Tensor | None = None  # (N,) next position id of each row
        self.last: Tensor | None = None

    @property
    def editable(self) -> bool:
        """Whether the cache's rows can be rewritten in place: every layer full attention (``EDITABLE_LAYERS``)."""
        return self._editable

    def _set_cache(self, cache) -> None:
        if cache is not self.cache:
            self.cache = cache
            layers = getattr(cache, "layers", None)  # the agent's cache is a (policy, critic) pair: never edited
            self._editable = layers is not None and all(type(layer) in EDITABLE_LAYERS for layer in layers)

    def _preallocate(self) -> None:
        """Move a full-attention cache's layers into ``PreallocatedLayer`` buffers with ``room`` to grow."""
        if not (self.preallocate and self.editable):
            return
        width = self.mask.shape[1]
        capacity = width + (width if self.room is None else self.room)
        layers = self.cache.layers
        for index, layer in enumerate(layers):
            if type(layer) is DynamicLayer:
                layers[index] = PreallocatedLayer(layer.keys, layer.values, capacity)

    @torch.no_grad()
    def check_cache(self, token_id: int, name: str) -> None:
        """Run one token and refuse a model whose KV cache is not a ``DynamicCache`` (``name`` names the model)."""
        ids = torch.tensor([[token_id]], device=self.device)
        out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.zeros_like(ids))
        cache = output_cache(out)
        if not isinstance(cache, DynamicCache):
            raise TypeError(
                f"the {name} ({type(self.model).__name__}) returns a {type(cache).__name__} KV cache; "
                "textenv steps models whose cache is a transformers DynamicCache (full, sliding-window or mixed "
                "layers). Load the model without a static or quantized cache implementation"
            )

    def _forward(self, **inputs):
        if self.model.training:  # a policy handed over mid-training steps without dropout, like the frozen models
            self.model.eval()
            try:
                return self._forward(**inputs)
            finally:
                self.model.train()
        if self.scores:
            with pooling_at_last_position(self.model):
                return self.model(**inputs, use_cache=True)
        with blocked_head(self.head):  # the LM head's product in vocabulary blocks on the CPU: the same floats
            return self.model(**inputs, use_cache=True)

    def rebuild(self, contexts: list[list[int]]) -> None:
        """Recompute every row's cache from its tokens (``contexts``, one list per row)."""
        self.prefill(*pad_batch(contexts, self.pad_token_id, side="left"))

    def _output(self, out) -> Tensor:
        if self.scores:
            check_scalar_output(out.logits)
            return out.logits[:, 0].float()
        return out.logits[:, -1]

    def _run_prompts(self, input_ids: Tensor, attention_mask: Tensor):
        ids, mask = crop_left_padding(input_ids.to(self.device), attention_mask.to(self.device))
        return self._forward(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)), mask

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Make the left-padded prompts (N, W) the contexts of all N rows; returns ``last``."""
        out, mask = self._run_prompts(input_ids, attention_mask)
        self._set_cache(output_cache(out))
        self.mask, self.position = mask, mask.sum(-1)
        self._preallocate()
        self.last = self._output(out)
        return self.last

    @torch.no_grad()
    def advance(self, tokens: Tensor, live: Tensor | None = None) -> Tensor:
        """Append ``tokens`` (N,) to every row (a masked pad to rows not ``live``); returns ``last``."""
        if live is None:
            live = torch.ones_like(tokens, dtype=torch.bool)
        tokens = torch.where(live, tokens, self.pad_token_id)
        out = self._forward_columns(tokens[:, None], live[:, None], self.position[:, None])
        return self._keep_outputs(self._output(out), live if self.scores else live[:, None], live.long())

    def _forward_columns(self, tokens: Tensor, has: Tensor, positions: Tensor):
        """One forward of the columns ``tokens`` (N, L) after the cache, real where ``has``; the cache grows by
        them. Returns the model's output."""
        self.mask = torch.cat([self.mask, has.long()], dim=1)
        out = self._forward(
            input_ids=tokens,
            attention_mask=self.mask,
            position_ids=positions,
            **{self.cache_keyword: self.cache},
        )
        self._set_cache(output_cache(out))
        return out

    def _keep_outputs(self, new: Tensor, keep: Tensor, counts: Tensor) -> Tensor:
        """``last`` from ``new`` where ``keep`` (a row that took no token keeps its last output); each row's next
        position ``counts`` further on; leading columns no row attends to dropped."""
        self.last = torch.where(keep, new, self.last)
        self.position = self.position + counts
        self._trim()
        return self.last

    def extend(self, tokens_by_row: dict[int, list[int]]) -> Tensor:
        """Append each row's ``tokens_by_row[row]`` (other rows: nothing); returns ``last``.

        The rows' tokens are columns after the cache, a row's tokens first and masked pads after them up to the
        longest row's (a row without tokens gets masked pads only, as a row that waits a step does). A
        full-attention cache takes them in one forward; others (sliding-window or mixed layers, scoring
        models) one column a forward, the same columns (the env rebuilds a cache that cannot take masked
        columns; see the class docstring).
        """
        width = max((len(ids) for ids in tokens_by_row.values()), default=0)
        if width == 0:
            return self.last
        rows = self.mask.shape[0]
        tokens = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        has = torch.zeros(rows, width, dtype=torch.bool)
        for row, ids in tokens_by_row.items():
            tokens[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            has[row, : len(ids)] = True
        tokens, has = tokens.to(self.device), has.to(self.device)
        if self.scores or not self.editable:
            for column in range(width):
                self.advance(tokens[:, column], has[:, column])
            return self.last
        return self._advance_block(tokens, has)

    @torch.no_grad()
    def _advance_block(self, tokens: Tensor, has: Tensor) -> Tensor:
        """``extend``'s one forward: columns ``tokens`` (N, L), real where ``has``, each row's real ones first."""
        counts = has.long().sum(1)
        last_real = (counts - 1).clamp(min=0)  # each row's last real column (0 for a row with none)
        columns = torch.arange(tokens.shape[1], device=self.device)
        out = self._forward_columns(tokens, has, self.position[:, None] + columns.clamp(max=last_real[:, None]))
        new = out.logits[torch.arange(len(tokens), device=self.device), last_real]
        return self._keep_outputs(new, (counts > 0)[:, None], counts)

    def start(
        self, rows: Tensor, input_ids: Tensor, attention_mask: Tensor, contexts: Callable[[], list[list[int]]]
    ) -> None:
        """Start rows ``rows`` (K,) on the left-padded prompts (K, W); ``contexts()`` gives every row's tokens,
        new prompts included. The first start must cover every row (a prefill); later ones start some
        (``start_rows``) or all (a prefill again)."""
        if self.cache is None or len(rows) == len(self.mask):
            if self.cache is not None or len(rows) == len(contexts()):
                order = torch.argsort(rows.cpu())
                self.prefill(input_ids[order], attention_mask[order])
                return
            raise RuntimeError("the first start of a stepper must cover every row")
        self.start_rows(rows, input_ids, attention_mask, contexts)

    @torch.no_grad()
    def start_rows(
        self, rows: Tensor, input_ids: Tensor, attention_mask: Tensor, contexts: Callable[[], list[list[int]]]
    ) -> None:
        """Make the left-padded prompts (K, W) the contexts of rows ``rows`` (K,); the other rows keep theirs.

        ``contexts()`` gives every row's tokens, new prompts included; a cache that cannot be
        edited in place is rebuilt from them.
        """
        if not self.editable:
            self.rebuild(contexts())
            return
        out, mask = self._run_prompts(input_ids, attention_mask)
        self._pad_cache_left(mask.shape[1] - self.mask.shape[1])
        width, length = self.mask.shape[1], mask.shape[1]
        for layer, new in zip(self.cache.layers, output_cache(out).layers):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[rows] = 0
                tensor[rows, :, width - length :] = getattr(new, name)
        self.mask[rows] = 0
        self.mask[rows, width - length :] = mask
        self.position[rows] = mask.sum(-1)
        self.last[rows] = self._output(out)
        self._trim()

    def _pad_cache_left(self, extra: int) -> None:
        if extra <= 0:
            return
        for layer in self.cache.layers:
            if isinstance(layer, PreallocatedLayer):
                layer.widen(extra)
                continue
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                padding = tensor.new_zeros(*tensor.shape[:2], extra, tensor.shape[3])
                setattr(layer, name, torch.cat([padding, tensor], dim=2))
        self.mask = torch.cat([self.mask.new_zeros(len(self.mask), extra), self.mask], dim=1)

    def _trim(self) -> None:
        """Drop leading cache positions that no row attends to (full-attention caches; others are rebuilt)."""
        if self.mask[:, 0].any() or not self.editable:
            return
        first = first_used_column(self.mask)
        for layer in self.cache.layers:
            if isinstance(layer, PreallocatedLayer):
                layer.drop(first)
            else:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self.mask = self.mask[:, first:]


# ---------------------------------------------------------------- sampling


@dataclass
class Samples:
    """Sampled continuations of a batch of prompts."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # up to and including EOS when there is one
    ended_with_eos: list[bool]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample ``max_new_tokens`` from ``model`` per prompt with a KV cache, then cut each row after its EOS."""
    stepper = CachedStepper(model, pad_token_id, room=max_new_tokens)
    logits = stepper.prefill(*pad_batch(prompt_ids, pad_token_id, side="left"))
    tokens = []
    for step in range(max_new_tokens):
        token, _ = sample_tokens(logits, temperature, generator)  # (B,)
        tokens.append(token)
        if step < max_new_tokens - 1:
            logits = stepper.advance(token)
    responses, ended = [], []
    for row in torch.stack(tokens, dim=1).tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        responses.append(row)
        ended.append(row[-1] == eos_token_id)
    return Samples(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses, ended_with_eos=ended)
