"""Semantic integrity weights w_i for the global loss (METHOD.md, Losses 2).

Modes (``mlip_dist.config.IntegrityMode``):

* ``relative`` (default): q(x) = (1 + cos(x, r_i)) / 2,
  a_i = q(v_i_masked) / max(q(v_i_full), 1e-6), clipped to [0, clip_max] and
  renormalised so that mean_i w_i = 1 over the GLOBAL batch; detached.
* ``learned``: w_i = softplus(a . m_i + b) from the visibility mask m_i, learned end
  to end (MaCo-style). Our normalisation choice: w_i is divided by its mean over the
  global batch, WITH gradient. Without it the loss is minimised by driving every
  w_i to 0; with it the module can only redistribute weight between pairs, and the
  loss scale stays that of the unweighted loss. Initialised to w_i = 1.
* ``none``: w_i = 1 (ablation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlip_dist.distributed import all_reduce_no_grad, gather_with_grad

__all__ = ["LearnedIntegrity", "normalise_to_global_mean", "relative_integrity_scores", "relative_integrity"]

_Q_FLOOR = 1e-6


@torch.no_grad()
def relative_integrity_scores(
    image_masked: torch.Tensor, image_full: torch.Tensor, report: torch.Tensor, clip_max: float = 2.0
) -> torch.Tensor:
    """Raw a_i = q(v_masked) / max(q(v_full), 1e-6), clipped to [0, clip_max]; (n,), no grad."""
    q_masked = (1 + F.cosine_similarity(image_masked.float(), report.float(), dim=-1)) / 2
    q_full = (1 + F.cosine_similarity(image_full.float(), report.float(), dim=-1)) / 2
    return (q_masked / q_full.clamp(min=_Q_FLOOR)).clamp(0.0, clip_max)


@torch.no_grad()
def normalise_to_global_mean(
    scores: torch.Tensor, world_size: int = 1, group: torch.distributed.ProcessGroup | None = None
) -> torch.Tensor:
    """scores / mean(scores over all ranks), detached; all ones if that mean is ~0 (no information)."""
    stats = torch.stack([scores.sum(), scores.new_tensor(float(scores.numel()))])
    stats = all_reduce_no_grad(stats, world_size, group)
    mean = stats[0] / stats[1].clamp(min=1)
    return torch.where(mean > _Q_FLOOR, scores / mean.clamp(min=_Q_FLOOR), torch.ones_like(scores))


def relative_integrity(
    image_masked: torch.Tensor,
    image_full: torch.Tensor,
    report: torch.Tensor,
    clip_max: float = 2.0,
    world_size: int = 1,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """w_i of ``integrity: relative`` for the local pairs: mean 1 over the global batch, no grad."""
    scores = relative_integrity_scores(image_masked, image_full, report, clip_max)
    return normalise_to_global_mean(scores, world_size, group)


class LearnedIntegrity(nn.Module):
    """w_i = softplus(a . m_i + b) / mean_global(softplus(a . m_j + b)) (``integrity: learned``).

    ``m_i`` is the (K,) visibility mask of image i (1 = visible). Lives inside the
    loss module (``MLIPLoss``), so its parameters must be handed to the optimiser
    together with the model's.
    """

    def __init__(self, num_patches: int) -> None:
        super().__init__()
        if num_patches < 1:
            raise ValueError(f"LearnedIntegrity: num_patches must be >= 1, got {num_patches}")
        self.num_patches = num_patches
        self.weight = nn.Parameter(torch.zeros(num_patches))
        # softplus(b) = 1 at init, so training starts from the unweighted loss. Shape (1,), not 0-d:
        # DeepSpeed broadcasts and partitions parameters through byte views, which 0-d tensors lack.
        self.bias = nn.Parameter(torch.full((1,), math.log(math.e - 1.0)))

    def forward(
        self,
        visibility_mask: torch.Tensor,
        world_size: int = 1,
        group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        if visibility_mask.shape[-1] != self.num_patches:
            raise ValueError(
                f"LearnedIntegrity: visibility mask has {visibility_mask.shape[-1]} patches, "
                f"module was built for {self.num_patches}"
            )
        raw = F.softplus(visibility_mask.to(self.weight.dtype) @ self.weight + self.bias)  # (n,)
        # Gathered with gradient: every pair's weight moves the shared normaliser.
        raw_all = gather_with_grad(raw, world_size, group)
        return raw / raw_all.mean()

    def extra_repr(self) -> str:
        return f"num_patches={self.num_patches}"
