"""Rank-0 TensorBoard writer for the pre-training loop (scalars, resolved config, heat-map images).

A run resumed from the checkpoint of step s opens the writer with ``purge_step`` s + 1: TensorBoard then
drops every event an earlier launch wrote after step s (the steps between the checkpoint and a crash, which
the resumed run logs again), so each tag holds each step once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from mlip_dist.config import MLIPConfig, to_dict


class TrainLogger:
    def __init__(self, log_dir: str | Path, config: MLIPConfig, resumed_at: int = 0):
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at + 1 if resumed_at > 0 else None)
        if resumed_at == 0:  # a resumed run keeps the config text of its first launch
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
