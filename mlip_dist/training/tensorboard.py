"""Rank-0 TensorBoard writer for the pre-training loop (scalars, resolved config, heat-map images)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from mlip_dist.config import MLIPConfig, to_dict


class TrainLogger:
    def __init__(self, log_dir: str | Path, config: MLIPConfig):
        self.writer = SummaryWriter(log_dir=str(log_dir))
        resolved = json.dumps(to_dict(config), indent=2)
        self.writer.add_text("config", f"```\n{resolved}\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, tag: str, image_hwc: np.ndarray, step: int, caption: str | None = None) -> None:
        self.writer.add_image(tag, image_hwc, step, dataformats="HWC")
        if caption:
            self.writer.add_text(f"{tag}/caption", caption, step)

    def close(self) -> None:
        self.writer.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.writer, name)
