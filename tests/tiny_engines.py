"""One-rank DeepSpeed engines around a two-layer net, for tests of the optimizer step and checkpoints.

Use with the ``single_rank_group`` fixture (conftest.py), which starts the one-process gloo group.
"""

from __future__ import annotations

import json

import torch
from launch_utils import REPO
from torch import nn


class TinyNet(nn.Module):
    """Two layers; ``poison`` rows give a finite loss with a NaN gradient (d sqrt(u)/du at u = 0 is inf, x 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, poison = batch
        out = self.fc2(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))))
        loss = out.float().pow(2).mean()
        if bool(poison.any()):
            loss = loss + torch.sqrt(out.float().sum() * 0.0)  # value + 0, gradient NaN
        return loss


def tiny_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A TinyNet batch of 4 (no poison rows), drawn from ``seed``."""
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)), torch.tensor([False])


def make_engine(stage: int, lr: float = 0.05, precision: str = "fp32", freeze: tuple[str, ...] = (),
                offload: bool = False):
    """A DeepSpeed engine built the way pretrain.py builds one (ds_configs template + TrainConfig)."""
    import deepspeed

    from mlip_dist.config import TrainConfig, ZeroStage
    from mlip_dist.training.checkpoint import frozen_fp32_copies
    from mlip_dist.training.ds_config import build_deepspeed_config
    from mlip_dist.training.engine import build_optimizer

    template = json.loads((REPO / "ds_configs" / f"zero{max(stage, 1)}.json").read_text())
    template["zero_optimization"]["stage"] = "auto"
    train = TrainConfig(global_batch_size=4, zero_stage=ZeroStage(stage), lr=lr, weight_decay=0.1, precision=precision,
                        offload=offload)
    config = build_deepspeed_config(template, train, world_size=1, bf16_supported=False)
    torch.manual_seed(0)
    model = TinyNet()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith(freeze))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_fp32 = frozen_fp32_copies(model)  # before DeepSpeed casts the module, as pretrain.py does
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(trainable, train), config=config)
    engine.frozen_fp32 = frozen_fp32
    return engine


def full_params(engine) -> list[torch.Tensor]:
    """Full fp32 master parameters whatever the ZeRO stage and precision, read from the optimizer: DeepSpeed's
    accessor at ZeRO-1/2/3, the unfused optimizer's fp32 groups at ZeRO-0 in bf16, the module's own tensors
    at ZeRO-0 in fp32 (there the module holds the masters)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 0:
        if not engine.bfloat16_enabled():
            return [p.detach().clone() for p in params]
        (low,), (high,) = engine.optimizer.fp16_groups, engine.optimizer.fp32_groups  # one parameter group
        assert [id(p) for p in low] == [id(p) for p in params]
        return [m.detach().clone() for m in high]
    return [safe_get_full_fp32_param(p).clone() for p in params]


def full_exp_avg(engine) -> list[torch.Tensor]:
    """AdamW's first moments, gathered from the optimizer partitions (fp32 engines)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        return [engine.optimizer.state[p]["exp_avg"].clone() for p in engine.module.parameters()]
    return [safe_get_full_optimizer_state(p, "exp_avg").clone() for p in engine.module.parameters()]
