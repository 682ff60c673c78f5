"""Build the DeepSpeed config from the training config (one source of truth).

The JSON files in ``ds_configs/`` hold only what is specific to a ZeRO layout; every value written
``"auto"`` there (batch sizes, clipping, precision) is filled here from ``TrainConfig``. A value that is
set in the JSON file and contradicts the training config is an error, not a silent override. There is
no optimizer block: the optimizer is built from ``TrainConfig`` by ``training.engine.build_optimizer``
(a fused torch AdamW) and handed to ``deepspeed.initialize``; a JSON file with an ``optimizer`` or
``scheduler`` block is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from mlip_dist.config import ConfigError, TrainConfig


def resolve_micro_batch(train: TrainConfig, world_size: int) -> int:
    """Per-rank batch; the global batch must split evenly over ranks (no gradient accumulation)."""
    if train.micro_batch_size is not None:
        if train.micro_batch_size * world_size != train.global_batch_size:
            raise ConfigError(
                f"train.micro_batch_size ({train.micro_batch_size}) x world size ({world_size}) must equal "
                f"train.global_batch_size ({train.global_batch_size}): gradient accumulation is refused because "
                "it would shrink the contrastive negatives to one micro-batch"
            )
        return train.micro_batch_size
    if train.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) is not divisible by the world size ({world_size})"
        )
    return train.global_batch_size // world_size


def use_bf16(precision: str, bf16_supported: bool) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    return bf16_supported


DEFAULT_ZERO_STAGE = 2  # for a DeepSpeed config whose stage is "auto" or absent, and no train.zero_stage


def resolve_zero_stage(template_stage: Any, train_stage: int | None) -> int:
    """The ZeRO stage: the DeepSpeed config's (ds_configs/zeroN.json decide the layout); ``train.zero_stage``
    may restate it but never contradict it (a ConfigError naming both values)."""
    if template_stage == "auto":
        return DEFAULT_ZERO_STAGE if train_stage is None else int(train_stage)
    if isinstance(template_stage, bool) or template_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage = {template_stage!r} in the DeepSpeed config is not 0, 1, 2, 3 or auto")
    if train_stage is not None and int(train_stage) != template_stage:
        raise ConfigError(
            f"train.zero_stage = {int(train_stage)} contradicts zero_optimization.stage = {template_stage} in the "
            "DeepSpeed config; the DeepSpeed config decides the layout: drop train.zero_stage or pass the "
            f"ds_configs/zero{int(train_stage)}.json layout"
        )
    return int(template_stage)


def _fill(value: Any, replacement: Any, where: str) -> Any:
    if value == "auto":
        return replacement
    if value != replacement:
        raise ConfigError(f"{where} = {value!r} in the DeepSpeed config contradicts the training config ({replacement!r})")
    return value


def build_deepspeed_config(
    template: dict[str, Any] | str | Path,
    train: TrainConfig,
    world_size: int,
    bf16_supported: bool,
) -> dict[str, Any]:
    """Return a complete DeepSpeed config dict for ``train`` on ``world_size`` ranks."""
    if not isinstance(template, dict):
        path = Path(template)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} does not exist")
        template = json.loads(path.read_text())
    config = copy.deepcopy(template)
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise ConfigError(
                f"the DeepSpeed config has a {block!r} block; mlip_dist builds the optimizer (AdamW) and the LR "
                "schedule (warm-up + cosine) from train.* (lr, min_lr, warmup_steps, beta1, beta2, weight_decay): "
                f"remove the block and set those fields"
            )
    micro = resolve_micro_batch(train, world_size)
    config["train_batch_size"] = _fill(config.get("train_batch_size", "auto"), train.global_batch_size, "train_batch_size")
    config["train_micro_batch_size_per_gpu"] = _fill(
        config.get("train_micro_batch_size_per_gpu", "auto"), micro, "train_micro_batch_size_per_gpu"
    )
    accumulation = config.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ConfigError(
            "gradient_accumulation_steps must be 1: accumulation would shrink the contrastive negatives "
            "(raise train.global_batch_size or add ranks instead)"
        )
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = _fill(config.get("gradient_clipping", "auto"), train.grad_clip, "gradient_clipping")
    bf16 = use_bf16(train.precision, bf16_supported)
    config.setdefault("bf16", {})
    config["bf16"]["enabled"] = _fill(config["bf16"].get("enabled", "auto"), bf16, "bf16.enabled")
    config.pop("fp16", None)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = resolve_zero_stage(zero.get("stage", "auto"), train.zero_stage)
    for key in ("offload_optimizer", "offload_param"):
        if key in zero:
            zero[key]["pin_memory"] = False if zero[key].get("pin_memory") == "auto" else zero[key].get("pin_memory")
    if train.offload and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        config["zero_force_ds_cpu_optimizer"] = False
    # The client optimizer (training.engine.build_optimizer) is a torch AdamW, also under ZeRO-Offload.
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)
    return config
