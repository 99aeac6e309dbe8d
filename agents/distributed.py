"""Data-parallel training with PyTorch's own engines: one process per device, launched by torchrun.

    torchrun --nproc_per_node 2 -m agents ...          # or: accelerate launch -m agents ...

Every process steps its own shard of the batched env (its own prompts, seeded
``seed + rank * RANK_SEED_PRIME``), the trainable model is wrapped in
DistributedDataParallel (or sharded with FSDP), gradients are averaged across
processes by the engine, metrics are averaged before they are logged, and rank 0
alone writes logs and checkpoints. Without torchrun's environment variables
everything below is a no-op: a single process, rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

RANK_SEED_PRIME = 1_000_003  # seeds of different ranks never collide for runs < 1M apart


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed: each rank draws other prompts and other samples."""
        return seed + self.rank * RANK_SEED_PRIME


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); returns (info, this rank's device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


def mean_metrics(metrics: dict[str, float], info: Distributed, device: torch.device) -> dict[str, float]:
    """Average every metric across ranks (all ranks must log the same keys)."""
    if not info.enabled:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / info.world_size).tolist()))


def sum_across_ranks(value: int, info: Distributed, device: torch.device) -> int:
    if not info.enabled:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def gather_objects(obj, info: Distributed) -> list:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def parameter_spread(model: torch.nn.Module, info: Distributed, device: torch.device) -> float:
    """Largest difference between ranks of any parameter tensor's sum: 0 when the replicas agree."""
    if not info.enabled:
        return 0.0
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(info.world_size)]
    dist.all_gather(gathered, sums)
    return float(max((g - gathered[0]).abs().max() for g in gathered))


def barrier(info: Distributed) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: Distributed) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class Sharded:
    """Save and load helpers for an FSDP-sharded agent: full (unsharded) state dicts, gathered on every rank.

    Rank 0 keeps an unsharded CPU twin of the agent to write ``save_pretrained``
    checkpoints from; that twin costs one full copy of the weights in host memory.
    """

    def __init__(self, twin: torch.nn.Module):
        self.twin = twin

    @staticmethod
    def options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def gathered_agent(self, model: torch.nn.Module, info: Distributed) -> torch.nn.Module | None:
        """The twin holding the current weights, on rank 0 (None elsewhere). A collective: call on every rank."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=self.options())
        if not info.is_main:
            return None
        self.twin.load_state_dict(state)
        return self.twin

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=self.options())

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=self.options())
