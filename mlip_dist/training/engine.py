"""Building the DeepSpeed engine of a run: the training module, its AdamW groups and the LR schedule."""

from __future__ import annotations

from typing import Any

import torch

from mlip_dist.config import MLIPConfig, TrainConfig
from mlip_dist.training.checkpoint import frozen_fp32_copies
from mlip_dist.training.module import MLIPTrainingModule, parameter_groups
from mlip_dist.training.schedule import cosine_with_warmup


def compile_encoders(module: MLIPTrainingModule) -> None:
    """torch.compile the image and text encoders in place (their state dict keys stay as they are, so
    checkpoints and exports are the same with and without compiling)."""
    module.model.image_encoder.compile()
    module.model.text_encoder.compile(dynamic=True)  # reports are padded to each batch's longest


def adamw_implementation(fused: bool) -> dict[str, bool | None]:
    """torch AdamW's implementation settings (constructor keywords and param-group keys): fused, or torch's
    single-tensor loop."""
    return {"fused": True, "foreach": None} if fused else {"fused": False, "foreach": False}


def build_optimizer(groups: list[dict[str, Any]], train: TrainConfig) -> torch.optim.AdamW:
    """The run's AdamW, handed to ``deepspeed.initialize`` as its client optimizer.

    ``train.fused_adamw`` (default): one kernel per parameter tensor and step, on the GPU and on the CPU.
    Under ZeRO-1/2/3 DeepSpeed hands it one flat fp32 partition per group, on which torch's default
    (single-tensor) implementation runs a dozen element-wise passes; DeepSpeed's own config block cannot ask
    for the fused one (docs/BENCHMARKS.md, "Fused AdamW"). The maths is AdamW's either way
    (tests/test_training_utils.py compares an update with torch's reference implementation).
    """
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8,
                             weight_decay=train.weight_decay, **adamw_implementation(train.fused_adamw))


def apply_adamw_implementation(engine: Any, fused: bool) -> None:
    """Make the engine's AdamW fused or not after a checkpoint was loaded into it: torch's
    ``Optimizer.load_state_dict`` takes the saved groups' settings, so a checkpoint of the other kind (or one
    from before ``train.fused_adamw``) would otherwise decide. The step counters move to where that
    implementation keeps them (fused: a float32 tensor on the parameter's device; else on the CPU)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO / bf16 wrappers hold the torch one
    for group in optimizer.param_groups:
        group.update(adamw_implementation(fused))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device if fused else "cpu", dtype=torch.float32)


def build_engine(config: MLIPConfig, ds_config: dict[str, Any], rank: int, world_size: int) -> tuple[
        Any, Any, dict[str, torch.Tensor]]:
    """(engine, LR scheduler, fp32 copies of the frozen parameters taken before DeepSpeed's bf16 cast)."""
    import deepspeed

    train = config.train
    module = MLIPTrainingModule(config.model, config.loss, rank=rank, world_size=world_size)
    module.model.set_gradient_checkpointing(config.model.gradient_checkpointing)
    if train.compile:
        compile_encoders(module)
    frozen = frozen_fp32_copies(module)

    def lr_lambda(step: int) -> float:
        return cosine_with_warmup(step, warmup_steps=train.warmup_steps, max_steps=train.max_steps,
                                  base_lr=train.lr, min_lr=train.min_lr) / train.lr

    groups = parameter_groups(module, train.weight_decay, lr=train.lr, lr_scales={
        "model.image_encoder.": train.image_encoder_lr_scale, "model.text_encoder.": train.text_encoder_lr_scale})
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=build_optimizer(groups, train),
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda),
    )
    return engine, scheduler, frozen
