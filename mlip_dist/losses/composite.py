"""The MLIP objective L = lambda_g L_g + lambda_l L_local + lambda_r L_rec (METHOD.md, Losses, Total).

``MLIPLoss`` consumes an ``MLIPOutput`` and is told its distributed setting on each
call. Each term returned is this rank's share, scaled so that the mean over ranks
equals the full-batch value (docs/ARCHITECTURE.md, Distributed losses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mlip_dist.config import IntegrityMode, LossConfig
from mlip_dist.losses.global_contrastive import global_contrastive_loss
from mlip_dist.losses.integrity import LearnedIntegrity, relative_integrity
from mlip_dist.losses.local_ot import local_ot_loss
from mlip_dist.losses.reconstruction import reconstruction_loss
from mlip_dist.models.output import MLIPOutput

__all__ = ["LossStats", "MLIPLoss", "MLIPLossOutput"]


@dataclass
class LossStats:
    """Detached diagnostics (local to this rank); call ``.item()`` only when logging."""

    integrity_mean: torch.Tensor
    integrity_std: torch.Tensor
    integrity_min: torch.Tensor
    integrity_max: torch.Tensor
    logit_scale: torch.Tensor
    ot_iterations: int
    ot_marginal_error: torch.Tensor
    ot_pairs: int

    def as_dict(self) -> dict[str, float]:
        return {
            "integrity/mean": float(self.integrity_mean),
            "integrity/std": float(self.integrity_std),
            "integrity/min": float(self.integrity_min),
            "integrity/max": float(self.integrity_max),
            "logit_scale": float(self.logit_scale),
            "ot/iterations": float(self.ot_iterations),
            "ot/marginal_error": float(self.ot_marginal_error),
            "ot/pairs": float(self.ot_pairs),
        }


@dataclass
class MLIPLossOutput:
    """``total`` carries the gradient; the terms are unweighted (before the lambdas) and differentiable."""

    total: torch.Tensor
    global_loss: torch.Tensor
    local_loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    integrity_weights: torch.Tensor  # (n,) detached, local pairs
    stats: LossStats

    def scalars(self) -> dict[str, float]:
        out = {
            "loss/total": float(self.total.detach()),
            "loss/global": float(self.global_loss.detach()),
            "loss/local": float(self.local_loss.detach()),
            "loss/reconstruction": float(self.reconstruction_loss.detach()),
        }
        out.update(self.stats.as_dict())
        return out


class MLIPLoss(nn.Module):
    """L = lambda_g L_g + lambda_l L_local + lambda_r L_rec (METHOD.md, Losses 1-4).

    Args:
        config: the ``LossConfig``.
        num_patches: K patches per image; required for ``integrity: learned``.
        norm_pix_loss: per-patch target normalisation (``DecoderConfig.norm_pix_loss``).

    With ``integrity: learned`` this module owns parameters (``LearnedIntegrity``): hand
    ``MLIPLoss.parameters()`` to the optimiser / DeepSpeed engine with the model's.
    A term whose lambda is 0 is not computed (its value is reported as 0).
    """

    def __init__(self, config: LossConfig, num_patches: int | None = None, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.config = config
        self.norm_pix_loss = norm_pix_loss
        self.integrity_mode = IntegrityMode(config.integrity)
        self.learned_integrity: LearnedIntegrity | None = None
        if self.integrity_mode is IntegrityMode.LEARNED:
            if num_patches is None:
                raise ValueError("MLIPLoss: integrity 'learned' needs num_patches (patches per image)")
            self.learned_integrity = LearnedIntegrity(num_patches)

    def integrity_weights(
        self, output: MLIPOutput, world_size: int, group: torch.distributed.ProcessGroup | None
    ) -> torch.Tensor:
        """w_i for the local pairs (METHOD.md, Losses 2)."""
        n = output.image_global.shape[0]
        if self.integrity_mode is IntegrityMode.NONE:
            return torch.ones(n, device=output.image_global.device)
        if self.integrity_mode is IntegrityMode.RELATIVE:
            if output.image_global_full is None:
                raise ValueError(
                    "MLIPLoss: integrity 'relative' needs MLIPOutput.image_global_full (the unmasked view); "
                    "let the model compute it or set loss.integrity to 'learned' or 'none'"
                )
            return relative_integrity(
                output.image_global, output.image_global_full, output.report_global,
                self.config.integrity_clip_max, world_size, group,
            )  # fmt: skip
        assert self.learned_integrity is not None
        return self.learned_integrity(output.visibility_mask, world_size, group)

    def forward(
        self,
        output: MLIPOutput,
        rank: int = 0,
        world_size: int = 1,
        group: torch.distributed.ProcessGroup | None = None,
    ) -> MLIPLossOutput:
        cfg = self.config
        device = output.image_global.device
        zero = torch.zeros((), device=device)
        weights = self.integrity_weights(output, world_size, group)

        global_term = zero
        if cfg.lambda_global:
            global_term = global_contrastive_loss(
                output.image_global, output.report_global, output.logit_scale, weights, rank, world_size, group
            )

        local_term = zero
        ot_iterations, ot_error, ot_pairs = 0, zero, 0
        if cfg.lambda_local:
            local = local_ot_loss(
                output.patch_features,
                output.sentence_features,
                output.sentence_mask,
                image_global=output.image_global,
                report_global=output.report_global,
                eps=cfg.ot_epsilon,
                max_iter=cfg.ot_max_iter,
                tol=cfg.ot_tol,
                temperature=cfg.local_temperature,
                chunk_pairs=cfg.ot_chunk_pairs,
                negatives=cfg.local_negatives,
                rank=rank,
                world_size=world_size,
                group=group,
                fixed_iterations=cfg.ot_fixed_iterations,
                compiled=cfg.ot_compile,
            )
            local_term = local.loss
            ot_iterations, ot_error, ot_pairs = local.stats.iterations, local.stats.marginal_error, local.stats.pairs

        rec_term = zero
        if cfg.lambda_reconstruction:
            if output.reconstruction is None or output.reconstruction_target is None:
                raise ValueError(
                    "MLIPLoss: lambda_reconstruction > 0 needs MLIPOutput.reconstruction and "
                    "reconstruction_target; build the model with its decoder or set loss.lambda_reconstruction 0"
                )
            rec_term = reconstruction_loss(
                output.reconstruction, output.reconstruction_target, None, self.norm_pix_loss, world_size, group
            )

        total = cfg.lambda_global * global_term + cfg.lambda_local * local_term + cfg.lambda_reconstruction * rec_term
        w = weights.detach().float()
        stats = LossStats(
            integrity_mean=w.mean(),
            integrity_std=w.std(unbiased=False),
            integrity_min=w.min(),
            integrity_max=w.max(),
            logit_scale=output.logit_scale.detach().float(),
            ot_iterations=ot_iterations,
            ot_marginal_error=ot_error.detach().float(),
            ot_pairs=ot_pairs,
        )
        return MLIPLossOutput(total, global_term, local_term, rec_term, w, stats)
