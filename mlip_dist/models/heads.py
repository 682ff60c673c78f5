"""Projection heads to the shared embedding space (METHOD.md, Encoders: Projections).

Linear (default) or 2-layer MLP heads map encoder features of any width to the shared dimension
d; the output is always L2-normalised along the last axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlip_dist.config import ProjectionKind


class Projection(nn.Module):
    """``x (..., in_dim) -> unit vectors (..., out_dim)``; linear or Linear-GELU-Linear."""

    def __init__(self, in_dim: int, out_dim: int, kind: ProjectionKind = ProjectionKind.LINEAR) -> None:
        super().__init__()
        kind = ProjectionKind(kind)
        if kind == ProjectionKind.LINEAR:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            # Hidden width = input width, as in ConVIRT/GLoRIA-style projection MLPs.
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=-1)
