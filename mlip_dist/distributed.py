"""Collectives for the losses, told their distributed setting (docs/ARCHITECTURE.md, Distributed losses).

Nothing here reads a global rank or world size: callers pass ``world_size`` and
``group``. With ``world_size == 1`` every helper is the identity and no process
group is needed, so the losses run (and are tested) in a single process.

Contract for the losses built on these helpers: rank ``r`` returns a loss whose
mean over ranks equals the full-batch loss. Gradients reaching a rank's local
features through :func:`gather_with_grad` are summed over ranks by the gather's
backward, so they equal ``world_size`` times the full-batch gradient; DeepSpeed's
gradient averaging divides that factor out again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_no_grad",
    "gather_no_grad",
    "gather_with_grad",
    "max_over_ranks",
    "pad_dim_to",
    "rank_offset",
]


def _check(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"world_size={world_size} but torch.distributed is not initialised; "
            "initialise the process group first or pass world_size=1"
        )


def gather_with_grad(tensor: torch.Tensor, world_size: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, differentiably.

    All ranks must pass the same shape. Rank ``r``'s block is rows
    ``[r * n, (r + 1) * n)``. The backward is a sum reduce-scatter: each rank's own
    block receives the sum over ranks of the gradients reaching it
    (``torch.distributed._functional_collectives.all_gather_single_autograd``, which
    replaces the deprecated ``torch.distributed.nn.functional.all_gather`` with the
    same gradient and works on gloo as well as NCCL).
    """
    _check(world_size)
    if world_size == 1:
        return tensor
    import torch.distributed._functional_collectives as funcol

    gathered = funcol.all_gather_single_autograd(
        tensor.contiguous(), 0, dist.group.WORLD if group is None else group
    )
    # The result may be an AsyncCollectiveTensor; wait here (differentiably) so callers get a plain tensor.
    if isinstance(gathered, funcol.AsyncCollectiveTensor):
        gathered = gathered.wait()
    return gathered


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor, world_size: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, detached."""
    _check(world_size)
    if world_size == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_no_grad(
    tensor: torch.Tensor,
    world_size: int,
    group: dist.ProcessGroup | None = None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """A detached, reduced copy of ``tensor`` (sum by default); the input is not modified."""
    _check(world_size)
    out = tensor.detach().clone()
    if world_size > 1:
        dist.all_reduce(out, op=op, group=group)
    return out


def pad_dim_to(tensor: torch.Tensor, size: int, dim: int, value: float | bool = 0) -> torch.Tensor:
    """Pad ``tensor`` with ``value`` along ``dim`` up to ``size`` (for gathering ragged sentence slots)."""
    missing = size - tensor.shape[dim]
    if missing < 0:
        raise ValueError(f"pad_dim_to: dim {dim} has size {tensor.shape[dim]} > target {size}")
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def max_over_ranks(value: int, world_size: int, group: dist.ProcessGroup | None, device: torch.device) -> int:
    """The maximum of an integer over ranks (one tiny collective; identity when world_size == 1)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def rank_offset(rank: int, local_size: int) -> int:
    """Index of rank ``rank``'s first sample in the gathered batch (equal local sizes)."""
    return rank * local_size
