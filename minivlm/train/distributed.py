"""Process groups, DDP and FSDP2, applied from outside the model (as torchtitan does).

``torchrun --nproc_per_node N -m minivlm train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:meth:`DistributedContext.from_env` joins the group (NCCL on GPUs, gloo on CPU). DDP wraps the
whole model; with ``train.fsdp`` every encoder block and decoder layer is sharded with
``fully_shard`` (FSDP2) and then the root, so each rank holds 1/N of the weights and optimizer
state. Checkpoints are always written as *full* state dicts by rank 0, the optimizer's keyed
by parameter name (``torch.distributed.checkpoint.state_dict``), so a run saved under one
strategy, or on another number of ranks, resumes under any other.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False
    strategy: str = "none"  # none | ddp | fsdp

    @classmethod
    def single(cls, device: str | torch.device | None = None) -> "DistributedContext":
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(0, 1, 0, dev)

    @classmethod
    def from_env(cls, device: str | None = None) -> "DistributedContext":
        """Join the process group torchrun describes, or a single-process context without it."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls.single(device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        created = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            created = True
        return cls(rank, world, local, dev, created)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group this context created (a no-op for one joined elsewhere).

        Every rank waits at a barrier first: a rank that tears its gloo connections down while
        a peer still reads the last collective's data makes that peer's transport thread abort
        the process (``terminate called without an active exception``, seen on a loaded 2-core
        machine). Call it on every rank, once all work is done.
        """
        if self.initialized_here and dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()

    # ---- collectives -------------------------------------------------------------------------
    def all_reduce_sums(self, *values: float | int) -> tuple[float | int, ...]:
        """Scalars summed over ranks in one collective (in float64; ints come back as ints)."""
        if self.world_size == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return tuple(type(v)(total) for v, total in zip(values, t.tolist()))

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Element-wise OR of ``flags`` over all ranks, so every rank takes the same branch.

        A rank that leaves the loop alone (its own SIGTERM, its own clock past the time
        budget) would leave the others waiting in the next collective forever.
        """
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def gather_counts(self, counts: Counter) -> Counter:
        """The sum of every rank's ``counts`` (e.g. skipped samples by reason), on every rank.

        An object gather: call it only when some rank counted something (keys differ by rank).
        """
        if self.world_size == 1:
            return Counter(counts)
        gathered: list[Counter | None] = [None] * self.world_size
        dist.all_gather_object(gathered, counts)
        return sum((Counter(c) for c in gathered), Counter())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ---- wrapping ---------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, fsdp: bool = False) -> nn.Module:
        """DDP around ``model``, or FSDP2 applied to it in place; ``model`` itself when single-process."""
        if self.world_size == 1:
            return model
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            # DDP broadcasts rank 0's weights when it wraps; fully_shard keeps each rank's own
            # slice, so make the ranks agree before sharding.
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
            for block in model.encoder.blocks:
                fully_shard(block)
            for layer in model.decoder.layers:
                fully_shard(layer)
            fully_shard(model)
            self.strategy = "fsdp"
            return model
        from torch.nn.parallel import DistributedDataParallel

        self.strategy = "ddp"
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Frozen parts and zero-gated cross-attention leave parameters without gradients.
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def no_sync(self, wrapped: nn.Module):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.strategy == "ddp":
            return wrapped.no_sync()
        if self.strategy == "fsdp":
            return _FSDPNoSync(wrapped)
        return nullcontext()

    # ---- state dicts (always full, rank-0 readable) -----------------------------------------------
    # ``model`` below is always the unwrapped module (FSDP2 shards it in place, so it is also the
    # sharded one): DDP's ``module.`` prefix never reaches a checkpoint.
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full state gathered from the shards under FSDP (a collective; filled on rank 0
        only); None otherwise: the module's own state dict is already full."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state keyed by parameter name, full (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict; every rank passes the whole of it."""
        if self.strategy != "fsdp":
            if hasattr(model, "load_checkpoint_state"):
                model.load_checkpoint_state(state)
            else:
                model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        own = set(model.state_dict())
        tied = model._tied_keys() if hasattr(model, "_tied_keys") else set()
        missing, unexpected = sorted(own - set(state) - tied), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
        # strict=False only because tied weights are stored once (checked above).
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full, name-keyed optimizer state (as :meth:`optimizer_state` returns)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class _FSDPNoSync:
    """FSDP2's equivalent of DDP's ``no_sync``: defer reduce-scatter until the last micro-batch."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.module.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.module.set_requires_gradient_sync(True)
        return False
