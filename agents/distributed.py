"""Data-parallel training with PyTorch's own engines: one process per device, launched by torchrun.

    torchrun --nproc_per_node 2 -m agents ...          # or: accelerate launch -m agents ...

Every process steps its own shard of the batched env (its own prompts, seeded
``seed + rank * RANK_SEED_PRIME``), the trainable model is wrapped in
DistributedDataParallel (or sharded with FSDP), gradients are averaged across
processes by the engine, metrics are averaged before they are logged, and rank 0
alone writes logs and checkpoints. Without torchrun's environment variables
``Distributed`` is a single process, rank 0 of 1, and every method is a no-op.
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

RANK_SEED_PRIME = 1_000_003  # seeds of different ranks never collide for runs < 1M apart


class Distributed:
    """This process's place in a torchrun job, and everything the training loop does across processes.

    ``wrap`` gives the module the update trains (the agent, its DDP replica or its
    FSDP shards); ``full_agent`` and ``optimizer_state`` give what a checkpoint saves.
    """

    def __init__(self, device: torch.device, fsdp: bool = False):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world_size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.fsdp = fsdp and self.enabled
        self._twin: torch.nn.Module | None = None  # FSDP: rank 0's unsharded CPU copy to save from
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """This rank's seed: each rank draws other prompts and other samples."""
        return seed + self.rank * RANK_SEED_PRIME

    # ---------------------------------------------------------------- the trained module
    def wrap(self, agent: torch.nn.Module) -> torch.nn.Module:
        """What the update calls: the agent itself, or its DDP replica / FSDP shards under torchrun.

        FSDP (PyTorch's ``fully_shard``) shards each transformer block and the rest of
        the agent; the rollout runs through the sharded agent, gathering one block's
        weights at a time. Rank 0 keeps an unsharded CPU twin to write checkpoints
        from, one full copy of the weights in host memory.
        """
        if not self.enabled:
            return agent
        if not self.fsdp:
            return DistributedDataParallel(
                agent, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        from torch.distributed.fsdp import fully_shard

        self._twin = copy.deepcopy(agent).cpu()
        for block in agent.modules():
            if isinstance(block, torch.nn.ModuleList):  # the transformer blocks
                for layer in block:
                    fully_shard(layer)
        return fully_shard(agent)

    def full_agent(self, model: torch.nn.Module, agent: torch.nn.Module) -> torch.nn.Module | None:
        """The agent with its current weights, whole, to save on rank 0. With FSDP a collective: call on every rank."""
        if not self.fsdp:
            return agent
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_state_options())
        if not self.is_main:
            return None
        self._twin.load_state_dict(state)
        return self._twin

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state, whole (gathered from the shards under FSDP: a collective)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_state_options())

    def load_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_full_state_options())

    # ---------------------------------------------------------------- collectives
    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average every metric across ranks (all ranks must log the same keys)."""
        if not self.enabled:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(keys, (values / self.world_size).tolist()))

    def sum(self, value: int) -> int:
        if not self.enabled:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def parameter_spread(self, model: torch.nn.Module) -> float:
        """Largest difference between ranks of any parameter tensor's sum: 0 when the replicas agree."""
        if not self.enabled:
            return 0.0
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(self.device)
        gathered = [torch.zeros_like(sums) for _ in range(self.world_size)]
        dist.all_gather(gathered, sums)
        return float(max((g - gathered[0]).abs().max() for g in gathered))

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            # gloo's worker thread drops the last collective's tensors after the collective completes, and that
            # needs the GIL. Were the group freed (by the DDP model's last reference) before it has, the main
            # thread would join that worker while holding the GIL: a deadlock, seen once at the end of a
            # torchrun run. Sleeping releases the GIL and lets the worker finish first.
            time.sleep(0.1)
            dist.destroy_process_group()


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)
