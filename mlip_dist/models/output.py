"""Output of the MLIP model (docs/ARCHITECTURE.md, Model output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MLIPOutput:
    """Projected, L2-normalised features of one batch, plus what the losses need.

    Shapes: B images/reports, d shared dim, K patches per image, Kv visible, Km = K - Kv masked,
    S sentence slots, P = patch_size**2 * channels.
    """

    image_global: torch.Tensor  # (B, d) masked view
    report_global: torch.Tensor  # (B, d)
    patch_features: torch.Tensor  # (B, Kv, d)
    visible_patch_idx: torch.Tensor  # (B, Kv) long, indices into the K patches
    sentence_features: torch.Tensor  # (B, S, d); padded slots are zero
    sentence_mask: torch.Tensor  # (B, S) bool
    visibility_mask: torch.Tensor  # (B, K) bool, True = visible
    logit_scale: torch.Tensor  # scalar, exp(t) already clamped to <= logit_scale_max
    image_global_full: torch.Tensor | None = None  # (B, d) unmasked view, no grad (integrity: relative)
    reconstruction: torch.Tensor | None = None  # (B, Km, P) predicted pixels of masked patches
    masked_patch_idx: torch.Tensor | None = None  # (B, Km) long
    reconstruction_target: torch.Tensor | None = None  # (B, Km, P) raw pixels of the masked patches
