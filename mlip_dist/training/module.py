"""The module DeepSpeed wraps: model + composite loss, told its distributed setting.

The loss lives inside the engine's module because the ``learned`` integrity variant has parameters
that must be optimised (and partitioned under ZeRO-3) with the encoders.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mlip_dist.config import IntegrityMode, LossConfig, ModelConfig
from mlip_dist.data.batch import MLIPBatch
from mlip_dist.losses.composite import MLIPLoss
from mlip_dist.models.mlip import MLIPModel


class MLIPTrainingModule(nn.Module):
    def __init__(self, model_config: ModelConfig, loss_config: LossConfig, *, rank: int, world_size: int,
                 group: Any = None):
        super().__init__()
        self.model = MLIPModel(model_config, loss_config)
        self.loss = MLIPLoss(loss_config, num_patches=self.model.image_encoder.num_patches,
                             norm_pix_loss=model_config.decoder.norm_pix_loss)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.compute_full_view = loss_config.integrity == IntegrityMode.RELATIVE

    def forward(self, batch: MLIPBatch) -> tuple[torch.Tensor, Any]:
        output = self.model(batch, compute_full_view=self.compute_full_view)
        terms = self.loss(output, rank=self.rank, world_size=self.world_size, group=self.group)
        return terms.total, terms


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings' position/cls tokens and the logit scale."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "mask_token", "reg_token", "logit_scale")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
