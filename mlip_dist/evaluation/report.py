"""Evaluation outputs: results.json, a markdown table, ROC-curve and heat-map-grid PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mlip_dist.evaluation.metrics import roc_curve
from mlip_dist.training.checkpoint import atomic_write_text

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def public(results: Any) -> Any:
    """Drop private entries (keys starting with '_': curves, example maps) for JSON output."""
    if isinstance(results, dict):
        return {k: public(v) for k, v in results.items() if not str(k).startswith("_")}
    if isinstance(results, (list, tuple)):
        return [public(v) for v in results]
    if isinstance(results, (np.floating, np.integer)):
        return results.item()
    return results


def flatten(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as 'a/b/c' -> value (TensorBoard scalars, markdown rows)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            flat[name] = float(value)
    return flat


def markdown_table(results: dict[str, Any]) -> str:
    """Headline metrics per task (per-class detail stays in results.json)."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, values in public(results).items():
        if not isinstance(values, dict):
            continue
        for name, value in flatten(values).items():
            if "per_class" in name or "per_channel" in name:
                continue
            lines.append(f"| {task} | {name} | {value:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(public(results), indent=2, sort_keys=True))
    atomic_write_text(out_dir / "results.md", markdown_table(results))


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, size: int = 480) -> None:
    """One ROC curve per class on a white canvas with a legend (no plotting library needed)."""
    margin = 40
    canvas = Image.new("RGB", (size + 180, size), "white")
    draw = ImageDraw.Draw(canvas)
    span = size - 2 * margin

    def point(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * span, size - margin - tpr * span

    draw.rectangle([margin, margin, margin + span, margin + span], outline="black")
    draw.line([point(0, 0), point(1, 1)], fill=(180, 180, 180))
    draw.text((margin, size - margin + 8), "false positive rate", fill="black")
    draw.text((4, margin - 20), "true positive rate", fill="black")
    for index, (name, (scores, labels)) in enumerate(sorted(curves.items())):
        curve = roc_curve(scores, labels)
        color = PALETTE[index % len(PALETTE)]
        draw.line([point(f, t) for f, t in zip(curve.fpr, curve.tpr, strict=True)], fill=color, width=2)
        draw.text((size + 4, margin + 14 * index), name[:24], fill=color)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)


def heatmap_grid(pictures: list[np.ndarray], path: Path, columns: int = 4) -> None:
    """Tile equally sized RGB pictures (from ``mlip_dist.viz.overlay``) into one PNG."""
    if not pictures:
        return
    height, width = pictures[0].shape[:2]
    rows = math.ceil(len(pictures) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height), "black")
    for index, picture in enumerate(pictures):
        canvas.paste(Image.fromarray(picture), ((index % columns) * width, (index // columns) * height))
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
