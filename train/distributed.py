"""Data-parallel training on PyTorch's own stack: `torchrun ... -m train` sets RANK/WORLD_SIZE/LOCAL_RANK and
the trainer joins the process group here (gloo on CPU, nccl on CUDA).

One `Dist` object answers every "which rank / reduce this" question, so the trainer reads the same with one
process or many: with a single process every method is the identity and nothing touches torch.distributed.

`train.parallel` picks how the ranks hold the model (`parallelize`): `ddp` keeps all weights on every rank and
averages gradients; `fsdp` (FSDP2, `fully_shard`) keeps 1/world of every weight, gradient and AdamW moment per
rank (dim-0 shards, as DTensors) and gathers a block's weights only while it runs. Under FSDP every forward is
a collective, so evaluation runs the same number of forwards on every rank (`Dist.eval_indices`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as td
from torch import nn
from tqdm import tqdm

from moe_core.common.errors import MoeError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from moe_core.model import RecursiveMoE


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int, what: str = "train.batch_size") -> slice:
        """The rows of a global batch this rank computes: contiguous, equal-sized blocks."""
        if global_batch % self.world:
            raise MoeError(f"{what}: {global_batch} is not divisible by the {self.world} ranks (it is the global "
                           f"batch, split evenly across ranks)")
        b = global_batch // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is true on any rank (a decision all ranks must take together)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def flags(self, values: list[bool], device: torch.device) -> list[bool]:
        """`any` for several flags in one collective."""
        if not self.enabled:
            return values
        t = torch.tensor([float(v) for v in values], device=device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def reduce_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logged statistics over all ranks: counts (`*_hist`, `*dropped`) summed, `*_min`/`*_max` by min/max,
        everything else averaged (every rank holds the same number of samples)."""
        if not self.enabled or not stats:
            return stats
        ops = {"sum": td.ReduceOp.SUM, "min": td.ReduceOp.MIN, "max": td.ReduceOp.MAX, "mean": td.ReduceOp.SUM}
        out: dict[str, torch.Tensor] = {}
        for kind, op in ops.items():
            keys = [k for k in sorted(stats) if _reduction(k) == kind]
            if not keys:
                continue
            flat = torch.cat([stats[k].detach().float().reshape(-1) for k in keys])
            td.all_reduce(flat, op=op)
            if kind == "mean":
                flat /= self.world
            for k, piece in zip(keys, flat.split([stats[k].numel() for k in keys]), strict=True):
                out[k] = piece.reshape(stats[k].shape)
        return out

    def sum_(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        td.all_reduce(t)
        return t.tolist()

    def eval_indices(self, n: int, lockstep: bool) -> tuple[list[int], int]:
        """Which of `n` evaluation items this rank computes: every world-th one, and how many of them count.

        With `lockstep` (an FSDP model: each forward is a collective) a rank with a shorter share repeats item 0
        until every rank runs as many as rank 0; the repeats are computed, not counted."""
        mine = list(range(self.rank, n, self.world))
        counted = len(mine)
        if lockstep:
            mine += [0] * (len(range(0, n, self.world)) - counted)
        return mine, counted

    def gather(self, data: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Every rank's tensor of the same shape and dtype (e.g. RNG states), on every rank, on the CPU."""
        if not self.enabled:
            return [data.cpu()]
        data = data.to(device)  # nccl moves CUDA tensors only
        parts = [torch.empty_like(data) for _ in range(self.world)]
        td.all_gather(parts, data)
        return [p.cpu() for p in parts]

    def log(self, message: str) -> None:
        """Console output, from rank 0 only (through tqdm, so a progress bar stays intact)."""
        if self.is_main:
            tqdm.write(message)

    def broadcast_text(self, text: str | None, device: torch.device) -> str:
        """Rank 0's string on every rank. Rank 0 passes None when it failed: it gets "" back (its own error is on
        its way), and the other ranks stop with a MoeError instead of waiting for it forever."""
        if not self.enabled:
            return text or ""
        data = torch.tensor(list(text.encode("utf-8")) if text is not None else [], dtype=torch.uint8)
        n = torch.tensor([len(data) if text is not None else -1], dtype=torch.int64, device=device)
        td.broadcast(n, src=0)
        if n.item() < 0:
            if self.is_main:
                return ""
            raise MoeError(f"rank {self.rank}: stopping, rank 0 failed to set up the run (its error is above)")
        buf = data.to(device) if self.is_main else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
        td.broadcast(buf, src=0)
        return bytes(buf.cpu().tolist()).decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            td.barrier()


SINGLE = Dist()  # one process, no process group


def parallelize(model: RecursiveMoE, dist: Dist, device: torch.device, parallel: str, find_unused: bool) -> nn.Module:
    """The module a training step calls. One process: `model` itself. `ddp`: a DistributedDataParallel wrapper
    (find_unused: parameters some steps leave without gradient). `fsdp`: `model` itself, sharded in place — each
    block of `model.net.blocks` is its own FSDP unit (gathered per call: the recursion calls each block many
    times) and the root holds the rest. Build the optimizer afterwards: sharding replaces the parameters.
    Compile blocks before this (as torchtitan does): FSDP's hooks then run around the compiled block."""
    if not dist.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415 - only FSDP runs need them
        from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

        mesh = init_device_mesh(device.type, (dist.world,))
        for block in model.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=find_unused)


def is_sharded(model: nn.Module) -> bool:
    """True for a model `parallelize` sharded with FSDP (its forward is a collective, its weights DTensors)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no model can be sharded (and no import cost)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """True for a DTensor: an FSDP weight, its gradient or AdamW moment (this rank holds a dim-0 piece)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the global value: a DTensor (an FSDP weight, or a norm of FSDP gradients) is gathered —
    a collective, so every rank calls it together — anything else is returned as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def _reduction(key: str) -> str:
    if key.endswith("_hist") or key.endswith("dropped"):
        return "sum"
    if key.endswith("_min"):
        return "min"
    if key.endswith("_max"):
        return "max"
    return "mean"


def use_cuda(requested_device: str, where: str = "train.device") -> bool:
    """Device choice "auto" | "cuda" | "cpu": True for CUDA ("auto": where present); a one-line MoeError naming
    `where` when CUDA is asked for and absent."""
    if requested_device == "cuda" and not torch.cuda.is_available():
        raise MoeError(f"{where}: 'cuda' requested but no CUDA device is available (use auto or cpu)")
    return requested_device == "cuda" or (requested_device == "auto" and torch.cuda.is_available())


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """What training and its evaluations run under: bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def init_from_env(requested_device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = use_cuda(requested_device)
    if world <= 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def shutdown(dist: Dist) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
