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


def line_chart(series: dict[str, tuple[Any, Any]], *, x_label: str, y_label: str, size: int = 480,
               unit_square: bool = False, title: str = "") -> Image.Image:
    """Lines on a white canvas with axes' ranges and a legend (no plotting library needed). ``unit_square``:
    both axes span [0, 1] with the diagonal drawn (ROC curves)."""
    margin, legend = 48, 200
    canvas = Image.new("RGB", (size + legend, size), "white")
    draw = ImageDraw.Draw(canvas)
    span = size - 2 * margin
    xs = [float(v) for x, _ in series.values() for v in x]
    ys = [float(v) for _, y in series.values() for v in y if np.isfinite(v)]
    if unit_square or not xs or not ys:
        x_low, x_high, y_low, y_high = 0.0, 1.0, 0.0, 1.0
    else:
        x_low, x_high, y_low, y_high = min(xs), max(xs), min(ys), max(ys)
    x_high, y_high = max(x_high, x_low + 1e-9), max(y_high, y_low + 1e-9)

    def point(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x_low) / (x_high - x_low) * span,
                size - margin - (y - y_low) / (y_high - y_low) * span)

    draw.rectangle([margin, margin, margin + span, margin + span], outline="black")
    if unit_square:
        draw.line([point(0, 0), point(1, 1)], fill=(180, 180, 180))
    draw.text((margin, size - margin + 8), f"{x_label}  [{x_low:.3g}, {x_high:.3g}]", fill="black")
    draw.text((4, margin - 32), f"{y_label}  [{y_low:.3g}, {y_high:.3g}]", fill="black")
    if title:
        draw.text((margin, 6), title, fill="black")
    for index, (name, (x, y)) in enumerate(sorted(series.items())):
        color = PALETTE[index % len(PALETTE)]
        points = [point(float(a), float(b)) for a, b in zip(x, y, strict=True) if np.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=color)
        draw.text((size + 4, margin + 14 * index), name[:30], fill=color)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def plot_roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, size: int = 480) -> None:
    """One ROC curve per class with a legend."""
    lines = {}
    for name, (scores, labels) in curves.items():
        curve = roc_curve(scores, labels)
        lines[name] = (curve.fpr, curve.tpr)
    save_png(line_chart(lines, x_label="false positive rate", y_label="true positive rate", size=size,
                        unit_square=True), path)


def stack_pictures(pictures: list[Image.Image | Path], path: Path) -> None:
    """Pictures (images or PNG paths; missing paths left out) one below the other, on white, as one PNG."""
    images = [p if isinstance(p, Image.Image) else Image.open(p).convert("RGB")
              for p in pictures if isinstance(p, Image.Image) or Path(p).is_file()]
    if not images:
        return
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    save_png(canvas, path)


def heatmap_grid(pictures: list[np.ndarray], path: Path, columns: int = 4) -> None:
    """Tile equally sized RGB pictures (from ``mlip_dist.viz.overlay``) into one PNG."""
    if not pictures:
        return
    height, width = pictures[0].shape[:2]
    rows = math.ceil(len(pictures) / columns)
    canvas = Image.new("RGB", (columns * width, rows * height), "black")
    for index, picture in enumerate(pictures):
        canvas.paste(Image.fromarray(picture), ((index % columns) * width, (index // columns) * height))
    save_png(canvas, path)
