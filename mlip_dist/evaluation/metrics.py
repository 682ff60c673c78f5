"""Evaluation metrics (METHOD.md, Evaluation): AUC, F1, accuracy, Recall@K, Dice, IoU, pointing
game and bootstrap confidence intervals.

Pure numpy; every function also accepts torch tensors (moved to the CPU and converted), so
the evaluation job can pass model outputs directly. No sklearn: each metric is short enough to
be checked against an independent reference in ``tests/test_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def as_numpy(values: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores_np = as_numpy(scores).astype(np.float64).reshape(-1)
    labels_np = as_numpy(labels).reshape(-1)
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"scores and labels differ in size: {scores_np.shape} vs {labels_np.shape}")
    if not np.isin(labels_np, (0, 1)).all():
        raise ValueError("labels must be 0/1 (mask out uncertain or missing labels first)")
    if not np.isfinite(scores_np).all():
        raise ValueError("scores contain NaN or infinity")
    return scores_np, labels_np.astype(bool)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values in sorted order.
    new_run = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    run_id = np.cumsum(new_run) - 1
    run_starts = np.flatnonzero(new_run)
    run_ends = np.concatenate([run_starts[1:], [len(values)]])
    mean_rank = (run_starts + run_ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U of
    the positives divided by n_pos * n_neg, with average ranks for ties.

    Raises ValueError when the labels hold only one class (AUC is undefined)."""
    scores_np, positive = _binary_inputs(scores, labels)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positive and {n_neg} negative")
    ranks = average_ranks(scores_np)
    u_statistic = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


@dataclass(frozen=True)
class RocCurve:
    """ROC points for decreasing thresholds; point i predicts positive for ``score >= thresholds[i]``.
    The first point is (0, 0) at threshold +inf, the last (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(scores: Any, labels: Any) -> RocCurve:
    """ROC curve with one point per distinct score (tied scores move both rates at once, so the
    trapezoidal area under these points equals :func:`roc_auc`)."""
    scores_np, positive = _binary_inputs(scores, labels)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC curve needs both classes, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-scores_np, kind="mergesort")
    sorted_scores = scores_np[order]
    sorted_pos = positive[order]
    last_of_run = np.concatenate([sorted_scores[1:] != sorted_scores[:-1], [True]])
    true_pos = np.cumsum(sorted_pos)[last_of_run]
    false_pos = np.cumsum(~sorted_pos)[last_of_run]
    return RocCurve(
        fpr=np.concatenate([[0.0], false_pos / n_neg]),
        tpr=np.concatenate([[0.0], true_pos / n_pos]),
        thresholds=np.concatenate([[np.inf], sorted_scores[last_of_run]]),
    )


@dataclass(frozen=True)
class BinaryMetrics:
    """Threshold metrics; a prediction is positive when ``score >= threshold``.
    Precision (recall) is 0 when nothing is predicted (actually) positive; F1 then 0 too."""

    threshold: float
    f1: float
    accuracy: float
    precision: float
    recall: float


def binary_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> BinaryMetrics:
    """F1, accuracy, precision and recall at a fixed threshold."""
    scores_np, positive = _binary_inputs(scores, labels)
    predicted = scores_np >= threshold
    true_pos = int((predicted & positive).sum())
    precision = true_pos / int(predicted.sum()) if predicted.any() else 0.0
    recall = true_pos / int(positive.sum()) if positive.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    accuracy = float((predicted == positive).mean()) if positive.size else float("nan")
    return BinaryMetrics(float(threshold), float(f1), accuracy, float(precision), float(recall))


def f1_optimal_threshold(scores: Any, labels: Any) -> BinaryMetrics:
    """The threshold among the distinct scores that maximises F1 (the highest such threshold on
    ties), with its metrics. Choose it on a validation split and report test metrics at it, or
    the result is optimistic."""
    scores_np, positive = _binary_inputs(scores, labels)
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("F1-optimal threshold needs at least one positive label")
    order = np.argsort(-scores_np, kind="mergesort")
    sorted_scores = scores_np[order]
    last_of_run = np.concatenate([sorted_scores[1:] != sorted_scores[:-1], [True]])
    true_pos = np.cumsum(positive[order])[last_of_run]
    predicted = (np.arange(1, scores_np.size + 1))[last_of_run]
    f1 = 2 * true_pos / (predicted + n_pos)  # = 2PR / (P + R)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    return binary_metrics(scores_np, positive, float(sorted_scores[last_of_run][best]))


def multiclass_accuracy(scores_or_predictions: Any, targets: Any) -> float:
    """Top-1 accuracy. ``scores_or_predictions`` is (N, C) scores (argmax taken, first index on
    ties) or (N,) predicted class indices; ``targets`` is (N,) class indices."""
    values = as_numpy(scores_or_predictions)
    targets_np = as_numpy(targets).reshape(-1)
    predictions = values.argmax(axis=1) if values.ndim == 2 else values.reshape(-1)
    if predictions.shape != targets_np.shape or targets_np.size == 0:
        raise ValueError(
            f"predictions {predictions.shape} and targets {targets_np.shape} must be equal, non-empty"
        )
    return float((predictions == targets_np).mean())


@dataclass(frozen=True)
class MultiLabelAUC:
    """Mean AUC over the classes where it is defined; ``skipped`` lists classes whose valid labels
    hold a single value (or none), which are left out of the mean."""

    mean: float
    per_class: dict[str, float]
    skipped: list[str]


def multilabel_auc(scores: Any, labels: Any, class_names: Sequence[str] | None = None) -> MultiLabelAUC:
    """Per-class and mean ROC AUC for (N, C) scores and labels. Label entries other than 0/1
    (NaN for missing, -1 for uncertain) are excluded from that class's AUC."""
    scores_np = as_numpy(scores).astype(np.float64)
    labels_np = as_numpy(labels).astype(np.float64)
    if scores_np.ndim != 2 or scores_np.shape != labels_np.shape:
        raise ValueError(f"scores {scores_np.shape} and labels {labels_np.shape} must be equal (N, C)")
    names = list(class_names) if class_names is not None else [str(i) for i in range(scores_np.shape[1])]
    if len(names) != scores_np.shape[1]:
        raise ValueError(f"{len(names)} class names for {scores_np.shape[1]} columns")
    per_class: dict[str, float] = {}
    skipped: list[str] = []
    for column, name in enumerate(names):
        valid = np.isin(labels_np[:, column], (0.0, 1.0))
        column_labels = labels_np[valid, column]
        if column_labels.size == 0 or column_labels.min() == column_labels.max():
            skipped.append(name)
            continue
        per_class[name] = roc_auc(scores_np[valid, column], column_labels)
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return MultiLabelAUC(mean, per_class, skipped)


def _relevance_matrix(similarity: np.ndarray, relevant: Any | None) -> np.ndarray:
    n_queries, n_items = similarity.shape
    if relevant is None:
        if n_queries != n_items:
            raise ValueError(
                f"without a relevance argument the similarity must be square, got {similarity.shape}"
            )
        return np.eye(n_queries, dtype=bool)
    relevant_np = as_numpy(relevant)
    if relevant_np.ndim == 1:
        if relevant_np.shape[0] != n_queries:
            raise ValueError(f"{relevant_np.shape[0]} target indices for {n_queries} queries")
        if relevant_np.min() < 0 or relevant_np.max() >= n_items:
            raise ValueError("target index out of range")
        matrix = np.zeros((n_queries, n_items), dtype=bool)
        matrix[np.arange(n_queries), relevant_np.astype(np.int64)] = True
        return matrix
    if relevant_np.shape != similarity.shape:
        raise ValueError(f"relevance matrix {relevant_np.shape} must match similarity {similarity.shape}")
    return relevant_np.astype(bool)


def recall_at_k(
    similarity: Any, ks: Sequence[int] = (1, 5, 10), relevant: Any | None = None
) -> dict[int, float]:
    """Recall@K for queries (rows) ranking items (columns) by decreasing similarity.

    A query counts as a hit at K when at least one relevant item is among its K best items;
    equal similarities are ranked by column index (stable), so results are deterministic.
    ``relevant``: None (item i is the match of query i), (Q,) target indices, or a (Q, I)
    boolean many-to-many relevance matrix. Queries with no relevant item raise ValueError.
    For report-to-image retrieval pass ``similarity.T`` (and ``relevant.T``).
    """
    sim = as_numpy(similarity).astype(np.float64)
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D, got {sim.shape}")
    relevance = _relevance_matrix(sim, relevant)
    if not relevance.any(axis=1).all():
        raise ValueError(f"{int((~relevance.any(axis=1)).sum())} queries have no relevant item")
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant_in_order = np.take_along_axis(relevance, order, axis=1)
    first_hit = relevant_in_order.argmax(axis=1)  # 0-based rank of the best-ranked relevant item
    return {int(k): float((first_hit < k).mean()) for k in ks}


def retrieval_recall(
    similarity: Any, ks: Sequence[int] = (1, 5, 10), relevant: Any | None = None
) -> dict[str, dict[int, float]]:
    """Image-to-report (rows of an (images, reports) similarity) and report-to-image Recall@K."""
    sim = as_numpy(similarity)
    relevance = _relevance_matrix(sim.astype(np.float64), relevant)
    return {
        "image_to_report": recall_at_k(sim, ks, relevance),
        "report_to_image": recall_at_k(sim.T, ks, relevance.T),
    }


def _mask_pair(pred: Any, target: Any, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    pred_np = as_numpy(pred)
    target_np = as_numpy(target)
    if pred_np.shape != target_np.shape:
        raise ValueError(f"prediction {pred_np.shape} and target {target_np.shape} masks differ in shape")
    pred_bool = pred_np if pred_np.dtype == bool else pred_np >= threshold
    target_bool = target_np if target_np.dtype == bool else target_np > 0
    if pred_bool.ndim == 2:
        pred_bool, target_bool = pred_bool[None], target_bool[None]
    return pred_bool.reshape(pred_bool.shape[0], -1), target_bool.reshape(target_bool.shape[0], -1)


def dice_per_image(pred: Any, target: Any, threshold: float = 0.5) -> np.ndarray:
    """Dice 2|P∩T| / (|P|+|T|) per image for (N, H, W) or (H, W) masks; 1.0 when both are
    empty (a correctly predicted negative, the SIIM competition convention). Non-bool
    predictions are binarised at ``score >= threshold``, non-bool targets at ``> 0``."""
    pred_flat, target_flat = _mask_pair(pred, target, threshold)
    intersection = (pred_flat & target_flat).sum(axis=1)
    total = pred_flat.sum(axis=1) + target_flat.sum(axis=1)
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def mean_dice(pred: Any, target: Any, threshold: float = 0.5) -> float:
    return float(dice_per_image(pred, target, threshold).mean())


def iou_per_image(pred: Any, target: Any, threshold: float = 0.5) -> np.ndarray:
    """Intersection over union per image (same input rules as :func:`dice_per_image`); empty-empty = 1."""
    pred_flat, target_flat = _mask_pair(pred, target, threshold)
    intersection = (pred_flat & target_flat).sum(axis=1)
    union = (pred_flat | target_flat).sum(axis=1)
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def mean_iou(pred: Any, target: Any, threshold: float = 0.5) -> float:
    return float(iou_per_image(pred, target, threshold).mean())


def pointing_game(heatmaps: Any, masks: Any) -> np.ndarray:
    """Per image, whether the heat map's maximum falls inside the region mask (METHOD.md, Grounding).

    ``heatmaps`` (N, h, w) may be coarser than ``masks`` (N, H, W), e.g. a 14x14 OT-plan row
    over patches: the arg-max cell (first in row-major order on ties) is mapped to the mask
    pixel under the cell's centre, ``(floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))``.
    Images with an empty mask raise ValueError (the game is undefined there).
    """
    maps = as_numpy(heatmaps).astype(np.float64)
    regions = as_numpy(masks) > 0
    if maps.ndim == 2:
        maps, regions = maps[None], regions[None]
    if maps.shape[0] != regions.shape[0]:
        raise ValueError(f"{maps.shape[0]} heat maps for {regions.shape[0]} masks")
    if not regions.reshape(regions.shape[0], -1).any(axis=1).all():
        raise ValueError("pointing game needs a non-empty mask for every image")
    n, h, w = maps.shape
    flat_best = maps.reshape(n, -1).argmax(axis=1)
    rows, cols = _cell_centre_pixels((h, w), regions.shape[1:])
    return regions[np.arange(n), rows[flat_best // w], cols[flat_best % w]]


def _cell_centre_pixels(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mask row and column under each heat-map cell's centre: ``floor((i + 0.5) * H / h)``, same for columns."""
    rows = np.floor((np.arange(grid[0]) + 0.5) * size[0] / grid[0]).astype(np.int64)
    cols = np.floor((np.arange(grid[1]) + 0.5) * size[1] / grid[1]).astype(np.int64)
    return rows, cols


def pointing_game_chance(grid: tuple[int, int], mask: Any) -> float:
    """Hit probability of :func:`pointing_game` when the arg-max cell is drawn uniformly over a ``grid``
    heat map: the share of cells whose centre pixel lies in ``mask`` (H, W)."""
    region = as_numpy(mask) > 0
    rows, cols = _cell_centre_pixels(grid, region.shape)
    return float(region[np.ix_(rows, cols)].mean())


@dataclass(frozen=True)
class ConfidenceInterval:
    """Percentile bootstrap interval of a metric; ``n_failed`` resamples where the metric was
    undefined (ValueError, e.g. one class only) are left out."""

    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int
    n_failed: int


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: Any,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap CI of ``metric(*arrays)``, resampling the first axis of every array
    jointly (cases, not cells) with ``numpy.random.default_rng(seed)``."""
    columns = [as_numpy(a) for a in arrays]
    if not columns:
        raise ValueError("bootstrap_ci needs at least one array")
    n = columns[0].shape[0]
    if any(c.shape[0] != n for c in columns):
        raise ValueError("all arrays must have the same length along the first axis")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    estimate = float(metric(*columns))
    rng = np.random.default_rng(seed)
    values = []
    failed = 0
    for _ in range(n_resamples):
        index = rng.integers(0, n, size=n)
        try:
            values.append(float(metric(*(c[index] for c in columns))))
        except ValueError:
            failed += 1
    if not values:
        raise ValueError(f"the metric failed on all {n_resamples} resamples")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return ConfidenceInterval(estimate, float(low), float(high), level, n_resamples, failed)
