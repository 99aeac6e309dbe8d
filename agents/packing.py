"""Packing a micro-batch's episodes into fewer rows for the update's teacher-forced forward.

Episodes end at different lengths, so a micro-batch laid out one episode per row is
partly padding (about a third on the default task), and a forward and backward cost
what their rows x columns cost. Packing places several episodes one after another in a
row, each with its own position ids restarting at 0, and passes no attention mask:
transformers then reads the restarts as sequence boundaries and lets no token attend
across one (``masking_utils.find_packed_sequence_indices``), so each episode sees only
itself, as in its own padded row. Nothing in the padded layout changes: the episodes'
tokens are gathered from it and the outputs are put back where they came from.

A model whose attention does not follow that convention would mix episodes, so the first
packed forward is preceded by a probe (``packing_works``): two short sequences packed in
one row must give the logits and values they give apart, or the update keeps the padded
rows (with a warning).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from textenv.lm import position_ids_from_mask

WIDTHS = (1, 2)
"""Row widths tried, in multiples of the padded layout's width; the plan with the fewest cells wins."""


@dataclass
class Packing:
    """Where each real token of a padded (B, L) layout sits in the packed (R, C) one."""

    ids: Tensor  # (R, C) token ids; the cells after a row's last episode hold a filler of its own
    position_ids: Tensor  # (R, C), restarting at 0 for every episode (and for the filler)
    index: Tensor  # (B, L): the flat index into (R * C) of each real token of the padded layout, 0 elsewhere
    real: Tensor  # (B, L) bool: the padded layout's real tokens

    def packed_positions(self, where: Tensor) -> Tensor:
        """(R, C) bool: the packed cells of the padded layout's True positions ``where`` (B, L) (real tokens only)."""
        flat = torch.zeros(self.ids.numel(), dtype=torch.bool, device=self.ids.device)
        flat[self.index[where]] = True
        return flat.view(self.ids.shape)

    def reorder(self, where: Tensor) -> Tensor:
        """The permutation that takes rows computed at ``packed_positions(where)`` (packed row-major order) to the
        row-major order of ``where`` in the padded layout."""
        return self.index[where].argsort().argsort()

    def pack(self, padded: Tensor) -> Tensor:
        """A per-token (B, L) tensor of the padded layout in the packed (R, C) one, 0 at the filler."""
        flat = padded.new_zeros(self.ids.numel())
        flat[self.index[self.real]] = padded[self.real]
        return flat.view(self.ids.shape)

    def unpack(self, packed: Tensor) -> Tensor:
        """A per-cell (R, C) tensor back in the padded (B, L) layout, 0 at the padding."""
        return packed.flatten()[self.index].masked_fill(~self.real, 0)

    def to(self, device: torch.device) -> Packing:
        """The plan on ``device``, copied without waiting for it (``agents.ppo.to_device``). The update plans on the
        host, where the rollout is: planning on a GPU would wait for it at every boolean selection."""
        return Packing(*(t.to(device, non_blocking=True) for t in (self.ids, self.position_ids, self.index, self.real)))


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of item indices, the longest item first into the first row with room; each row's sum <= capacity."""
    rows: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[item] <= free:
                rows[r].append(item)
                room[r] -= lengths[item]
                break
        else:
            rows.append([item])
            room.append(capacity - lengths[item])
    return rows


def plan_packing(ids: Tensor, attention: Tensor, filler: int | None = None) -> Packing | None:
    """The packing of ``ids`` (B, L) with fewer cells than B x L, or None when packing saves nothing.

    Rows are ``WIDTHS`` x L wide (first-fit decreasing; the width with the fewest cells);
    the cells after a row's last episode hold ``filler`` with positions 0, 1, ..., L - 1, 0, 1, ...: sequences of
    their own that no episode attends to (attention is causal), and no position beyond the padded layout's.
    ``filler`` None: the batch's first real token, not the pad token (transformers warns of padding without a mask).
    """
    real = attention.bool()
    lengths = real.sum(1).tolist()
    batch, width = real.shape
    best = None
    for factor in WIDTHS:
        rows = first_fit_decreasing(lengths, factor * width)
        if best is None or len(rows) * factor * width < len(best[0]) * best[1]:
            best = rows, factor * width
    rows, capacity = best
    if len(rows) * capacity >= batch * width:
        return None
    start = torch.empty(batch, dtype=torch.long)
    used = torch.empty(len(rows), dtype=torch.long)
    for r, items in enumerate(rows):
        offset = r * capacity
        for item in items:
            start[item] = offset
            offset += lengths[item]
        used[r] = offset - r * capacity
    device = ids.device
    positions = position_ids_from_mask(real)
    index = torch.where(real, start.to(device)[:, None] + positions, 0)
    columns = torch.arange(capacity, device=device)
    # the filler: 0, 1, ..., restarting every ``width`` cells, so that no position exceeds the padded layout's (a
    # model with as many positions as the layout is wide reads a row twice as wide)
    packed_positions = ((columns - used.to(device)[:, None]).clamp(min=0) % width).flatten()
    packed_positions[index[real]] = positions[real]
    tokens = ids[real]
    packed_ids = ids.new_empty(len(rows) * capacity).fill_(tokens[0] if filler is None else filler)  # no host sync
    packed_ids[index[real]] = tokens
    shape = (len(rows), capacity)
    return Packing(packed_ids.view(shape), packed_positions.view(shape), index, real)


_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def packing_works(agent: nn.Module) -> bool:
    """Whether ``agent`` (an ``ActorCritic``) scores two sequences packed in one row as it scores them apart.

    Probed once per agent (no gradient); a failure warns and is remembered.
    """
    if agent not in _PROBED:
        name = type(unwrapped(agent).policy).__name__
        vocab = unwrapped(agent).policy.get_input_embeddings().num_embeddings
        _PROBED[agent] = probe(lambda ids, mask, positions: agent(ids, mask, positions), vocab, agent, name)
    return _PROBED[agent]


def lm_packing_works(model: nn.Module) -> bool:
    """``packing_works`` for a plain causal LM (supervised fine-tuning packs demonstrations the same way)."""
    if model not in _PROBED:
        base = unwrapped(model)
        vocab = base.get_input_embeddings().num_embeddings

        def forward(ids, mask, positions):
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)

        _PROBED[model] = probe(forward, vocab, model, type(base).__name__)
    return _PROBED[model]


def probe(forward, vocab: int, module: nn.Module, name: str) -> bool:
    """Two short sequences packed in one row (positions restarting, no mask) give the outputs (logits, and values
    where there are) they give apart; else a warning, and False."""
    parameter = next(module.parameters())
    vocab = min(vocab, 1000)
    ids = torch.arange(7, device=parameter.device) * 37 % max(vocab - 3, 1) + 3  # 7 ordinary tokens
    first, second = ids[:4], ids[4:]
    positions = torch.cat([torch.arange(4), torch.arange(3)]).to(parameter.device)
    with torch.no_grad(), torch.autocast(parameter.device.type, enabled=False):
        apart = [
            forward(x[None], torch.ones_like(x)[None], p[None])
            for x, p in ((first, positions[:4]), (second, positions[4:]))
        ]
        packed = forward(ids[None], None, positions[None])
    tolerance = 1e-4 if parameter.dtype == torch.float32 else 3e-2
    works = True
    for key in ("logits", "values"):
        if output(packed, key) is None:
            continue
        whole = torch.cat([output(out, key)[0] for out in apart]).float()
        scale = max(1.0, float(whole.abs().max()))
        works = works and bool((output(packed, key)[0].float() - whole).abs().max() <= tolerance * scale)
    if not works:
        warnings.warn(
            f"{name} does not keep packed sequences apart (transformers' position-id convention); its batches run "
            "padded, one sequence per row",
            stacklevel=3,
        )
    return works


def output(out, key: str) -> Tensor | None:
    """A model output's ``key`` (a transformers output is a dict: its ``values`` attribute is the dict method)."""
    if isinstance(out, Mapping):
        return out.get(key)
    return getattr(out, key, None)


def unwrapped(agent: nn.Module) -> nn.Module:
    """The agent itself, from a DistributedDataParallel wrapper or not."""
    return getattr(agent, "module", agent)  # DistributedDataParallel keeps the agent as .module
