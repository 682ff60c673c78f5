"""Global masked contrastive loss (METHOD.md, Losses 1).

    s_ij = exp(t) <v_i, r_j>,
    L_g  = -1/(2N) sum_i w_i [ log softmax_j(s_i.)_i + log softmax_j(s_.i)_i ],

over the global batch of N pairs, with integrity weights ``w_i`` (Losses 2).
Rank ``r`` computes the rows of its local images against all gathered reports
and the columns of its local reports against all gathered images; its partial
sum is exactly its share of L_g, so the partial losses of all ranks add up to
L_g (:func:`global_contrastive_partial`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mlip_dist.distributed import gather_with_grad

__all__ = ["LogitScale", "global_contrastive_loss", "global_contrastive_partial"]


class LogitScale(nn.Module):
    """Learnable temperature t with ``forward() = min(exp(t), max_scale)`` (METHOD.md, Losses 1).

    The model owns this module (so the optimiser and ZeRO see ``t`` as a model
    parameter) and reports ``forward()`` as ``MLIPOutput.logit_scale``. The clamp is
    on the value, so at the cap the gradient to ``t`` is zero, as in CLIP.
    """

    def __init__(self, init: float = math.log(1 / 0.07), max_scale: float = 100.0) -> None:
        super().__init__()
        if max_scale <= 0:
            raise ValueError(f"LogitScale: max_scale must be positive, got {max_scale}")
        self.max_scale = float(max_scale)
        # Shape (1,), not a 0-d tensor: DeepSpeed broadcasts and partitions parameters through
        # byte views, which 0-d tensors do not support.
        self.t = nn.Parameter(torch.full((1,), float(init)))

    def forward(self) -> torch.Tensor:
        return self.t.exp().clamp(max=self.max_scale)[0]

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}"


def global_contrastive_partial(
    image_local: torch.Tensor,
    report_local: torch.Tensor,
    image_all: torch.Tensor,
    report_all: torch.Tensor,
    logit_scale: torch.Tensor,
    weights_local: torch.Tensor | None,
    offset: int,
) -> torch.Tensor:
    """Rank-local share of L_g: the local rows and local columns, divided by 2N.

    Args:
        image_local, report_local: (n, d) this rank's L2-normalised features.
        image_all, report_all: (N, d) gathered features; rows ``[offset, offset + n)`` are the local ones.
        logit_scale: scalar exp(t), already clamped.
        weights_local: (n,) integrity weights of the local pairs, or None for w = 1.
        offset: global index of the first local pair.

    Summing this over ranks (offsets 0, n, 2n, ...) gives L_g exactly.
    """
    n, total = image_local.shape[0], image_all.shape[0]
    targets = torch.arange(offset, offset + n, device=image_local.device)
    # Similarities in fp32: softmax over a large batch in bf16 loses the positive's margin.
    rows = logit_scale.float() * image_local.float() @ report_all.float().t()  # (n, N)
    cols = logit_scale.float() * report_local.float() @ image_all.float().t()  # (n, N) = columns of s
    per_pair = F.cross_entropy(rows, targets, reduction="none") + F.cross_entropy(cols, targets, reduction="none")
    if weights_local is not None:
        per_pair = weights_local.float() * per_pair
    return per_pair.sum() / (2 * total)


def global_contrastive_loss(
    image_features: torch.Tensor,
    report_features: torch.Tensor,
    logit_scale: torch.Tensor,
    weights: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """L_g for this rank (METHOD.md, Losses 1), scaled so the mean over ranks is the full-batch L_g.

    ``image_features``/``report_features`` (n, d) and ``weights`` (n,) are local; all ranks
    must have the same n. Features are gathered with gradient when ``world_size > 1``.
    """
    image_all = gather_with_grad(image_features, world_size, group)
    report_all = gather_with_grad(report_features, world_size, group)
    offset = rank * image_features.shape[0]
    partial = global_contrastive_partial(
        image_features, report_features, image_all, report_all, logit_scale, weights, offset
    )
    return partial * world_size
