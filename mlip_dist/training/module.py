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


NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token", "logit_scale")


def parameter_groups(module: nn.Module, weight_decay: float, *, lr: float | None = None,
                     lr_scales: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings' position/cls tokens and the logit scale.

    ``lr_scales`` maps a parameter-name prefix (e.g. ``model.text_encoder.``) to a multiplier of ``lr`` for the
    parameters under it (a pretrained encoder fine-tuned more gently than the new heads); groups with a
    scale other than 1 carry their own ``lr``, which the LR schedule then scales like the others. The first
    groups are the unscaled ones, so ``param_groups[0]`` holds the base learning rate.
    """
    scales = {prefix: scale for prefix, scale in (lr_scales or {}).items() if scale != 1.0}
    if scales and lr is None:
        raise ValueError("parameter_groups: lr_scales need the base lr")
    # The two unscaled groups always exist (first, as before the scales); a scaled group only once it has a member.
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, True): [], (1.0, False): []}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        decays = not (param.ndim < 2 or any(k in name for k in NO_DECAY_NAMES))
        groups.setdefault((scale, decays), []).append(param)
    result = []
    for (scale, decays), params in groups.items():
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        result.append(group)
    return result
