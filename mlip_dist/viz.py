"""Drawing: a sentence's OT transport row as a heat map over its X-ray (METHOD.md, Evaluation: Grounding)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def patch_heatmap(plan_row: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Upsample a per-patch mass vector (K,) on a ``grid`` of patches to ``size`` (H, W), scaled to [0, 1]."""
    heat = plan_row.detach().float().reshape(1, 1, *grid)
    heat = F.interpolate(heat, size=size, mode="bilinear", align_corners=False)[0, 0]
    heat = heat - heat.min()
    return heat / heat.max().clamp_min(1e-12)


def overlay(image: torch.Tensor, heat: torch.Tensor, caption: str, alpha: float = 0.45,
            min_width: int = 256) -> np.ndarray:
    """Grayscale image (C,H,W, any range) + heat (H,W in [0,1]) + caption -> uint8 RGB (H+20, W, 3)."""
    gray = image.detach().float()[0]
    if gray.shape[-1] < min_width:  # small training resolutions: enlarge so the caption is readable
        scale = min_width / gray.shape[-1]
        size = (int(gray.shape[0] * scale), min_width)
        gray = F.interpolate(gray[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        heat = F.interpolate(heat.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp_min(1e-12)
    rgb = gray[..., None].repeat(1, 1, 3)
    red = torch.stack([heat, torch.zeros_like(heat), 1 - heat], dim=-1)
    mixed = ((1 - alpha) * rgb + alpha * red).clamp(0, 1)
    array = (mixed.numpy() * 255).astype(np.uint8)
    canvas = Image.new("RGB", (array.shape[1], array.shape[0] + 20), "black")
    canvas.paste(Image.fromarray(array), (0, 20))
    ImageDraw.Draw(canvas).text((2, 4), caption[: max(8, array.shape[1] // 6 - 1)], fill="white")
    return np.asarray(canvas)
