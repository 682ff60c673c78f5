"""Evaluation tasks on gathered frozen features (METHOD.md, Evaluation).

Every function here is deterministic given its inputs and seeds, so a 1-rank and a 2-rank evaluation
(which gather identical features) give identical metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mlip_dist.evaluation.extract import EvalFeatures
from mlip_dist.evaluation.metrics import (
    binary_metrics,
    mean_dice,
    multiclass_accuracy,
    multilabel_auc,
    pointing_game,
    pointing_game_chance,
    retrieval_recall,
    roc_auc,
)
from mlip_dist.losses.local_ot import ot_distance_grid, paired_plans
from mlip_dist.text.tokenize import tokenize_with_spans

FEW_SHOT_FRACTIONS = (0.01, 0.1, 1.0)


@dataclass
class PromptFeatures:
    """Projected features of one class's prompts, each prompt encoded as a one-sentence report."""

    positive_report: np.ndarray  # (P, d)
    negative_report: np.ndarray  # (Q, d)
    positive_sentence: np.ndarray  # (P, d)
    negative_sentence: np.ndarray  # (Q, d)


@torch.no_grad()
def encode_prompts(model: Any, tokenizer: Any, prompts: dict[str, Any], max_length: int,
                   device: torch.device | str = "cpu") -> dict[str, PromptFeatures]:
    def encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tokens = tokenize_with_spans(tokenizer, [[t] for t in texts], max_length, 1)
        text = model.encode_text(*(t.to(device) for t in tokens))
        return text.report_features.float().cpu().numpy(), text.sentence_features[:, 0].float().cpu().numpy()

    features = {}
    for name, prompt_set in prompts.items():
        pos_report, pos_sentence = encode(list(prompt_set.positive))
        neg_report, neg_sentence = encode(list(prompt_set.negative))
        features[name] = PromptFeatures(pos_report, neg_report, pos_sentence, neg_sentence)
    return features


def ot_similarity(patches: np.ndarray, sentences: np.ndarray, eps: float, max_iter: int, tol: float) -> np.ndarray:
    """sigma = 1 - d between each image's patches (N, K, d) and one sentence set (M, d) (METHOD.md, Losses 3)."""
    patch_t = torch.from_numpy(patches).float()
    sentence_t = torch.from_numpy(sentences).float()[None]
    distances, _ = ot_distance_grid(patch_t, sentence_t, torch.ones(patch_t.shape[:2], dtype=torch.bool),
                                    torch.ones(sentence_t.shape[:2], dtype=torch.bool), eps, max_iter, tol)
    return (1.0 - distances[:, 0]).numpy()


def _two_way_softmax(positive: np.ndarray, negative: np.ndarray, scale: float) -> np.ndarray:
    logits = np.stack([positive, negative], axis=1) * scale
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs[:, 0] / probs.sum(axis=1)


def zero_shot_scores(features: EvalFeatures, prompt: PromptFeatures, *, logit_scale: float,
                     local_temperature: float, eps: float, max_iter: int, tol: float) -> dict[str, np.ndarray]:
    """P(positive) per image: global (mean positive vs mean negative prompt similarity), local (OT
    similarity of the image's patches to the positive vs the negative prompt sentences) and their mean."""
    pos = features.image_global @ prompt.positive_report.T
    neg = features.image_global @ prompt.negative_report.T
    scores = {"global": _two_way_softmax(pos.mean(1), neg.mean(1), logit_scale)}
    if features.patch_features is not None:
        local_pos = ot_similarity(features.patch_features, prompt.positive_sentence, eps, max_iter, tol)
        local_neg = ot_similarity(features.patch_features, prompt.negative_sentence, eps, max_iter, tol)
        scores["local"] = _two_way_softmax(local_pos, local_neg, 1.0 / local_temperature)
        scores["combined"] = (scores["global"] + scores["local"]) / 2
    return scores


def classes_for(dataset_info: dict[str, Any], prompts: dict[str, Any]) -> tuple[str, list[str]]:
    """(kind, class names): kind is the eval benchmark name, or 'reports' for make_shards output."""
    from mlip_dist.data.mimic import CHEXPERT_LABELS

    benchmark = dataset_info.get("benchmark")
    if benchmark:
        return benchmark, list(dataset_info.get("classes", []))
    return "reports", [c for c in CHEXPERT_LABELS if c in prompts and c != "No Finding"]


def chexpert_target(value: Any) -> float:
    """A CheXpert label as a binary target: 1 positive, NaN uncertain (-1), 0 negative or not mentioned."""
    return np.nan if value == -1 else 1.0 if value == 1 else 0.0


def binary_labels(features: EvalFeatures, class_name: str) -> np.ndarray:
    """1 / 0 per image, NaN where unknown: CheXpert labels (1 positive, 0 or not mentioned negative,
    -1 uncertain unknown) or an eval benchmark's binary ``label``."""
    values = []
    for meta in features.meta:
        if "labels" in meta and isinstance(meta["labels"], dict) and class_name in meta["labels"]:
            values.append(chexpert_target(meta["labels"][class_name]))
        elif "label" in meta:
            values.append(float(meta["label"]))
        else:
            values.append(np.nan)
    return np.array(values)


def zero_shot_binary(features: EvalFeatures, prompts: dict[str, PromptFeatures], classes: list[str],
                     **score_kwargs: Any) -> dict[str, Any]:
    results: dict[str, Any] = {"per_class": {}, "skipped": []}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in classes:
        labels = binary_labels(features, name)
        valid = ~np.isnan(labels)
        if name not in prompts or valid.sum() == 0 or labels[valid].min() == labels[valid].max():
            results["skipped"].append(name)
            continue
        scores = zero_shot_scores(features, prompts[name], **score_kwargs)
        per_score = {}
        for kind, values in scores.items():
            metrics = binary_metrics(values[valid], labels[valid])
            per_score[kind] = {"auc": roc_auc(values[valid], labels[valid]), "f1": metrics.f1,
                               "accuracy": metrics.accuracy}
        results["per_class"][name] = {**per_score, "positives": int(labels[valid].sum()), "n": int(valid.sum())}
        curves[name] = (scores.get("combined", scores["global"])[valid], labels[valid])
    for kind in ("global", "local", "combined"):
        values = [r[kind]["auc"] for r in results["per_class"].values() if kind in r]
        if values:
            results[f"mean_auc_{kind}"] = float(np.mean(values))
            results[f"mean_f1_{kind}"] = float(np.mean([r[kind]["f1"] for r in results["per_class"].values()]))
            results[f"mean_accuracy_{kind}"] = float(np.mean([r[kind]["accuracy"]
                                                              for r in results["per_class"].values()]))
    results["_curves"] = curves
    return results


def zero_shot_multiclass(features: EvalFeatures, prompts: dict[str, PromptFeatures], classes: list[str],
                         **score_kwargs: Any) -> dict[str, Any]:
    """CheXpert 5x200-style: predict the class whose positive prompts are most similar."""
    targets = np.array([int(meta["class"]) for meta in features.meta])
    global_scores = np.stack([(features.image_global @ prompts[c].positive_report.T).mean(1) for c in classes], 1)
    results = {"accuracy_global": multiclass_accuracy(global_scores, targets), "n": int(len(targets))}
    if features.patch_features is not None:
        kwargs = {k: score_kwargs[k] for k in ("eps", "max_iter", "tol")}
        local_scores = np.stack([ot_similarity(features.patch_features, prompts[c].positive_sentence, **kwargs)
                                 for c in classes], 1)
        results["accuracy_local"] = multiclass_accuracy(local_scores, targets)
        combined = F.softmax(torch.from_numpy(global_scores * score_kwargs["logit_scale"]), 1) + F.softmax(
            torch.from_numpy(local_scores / score_kwargs["local_temperature"]), 1)
        results["accuracy_combined"] = multiclass_accuracy(combined.numpy(), targets)
    return results


def retrieval(features: EvalFeatures) -> dict[str, Any]:
    """Image-to-report and report-to-image Recall@1/5/10 on the split (pairs matched by index)."""
    if features.report_global is None:
        return {"skipped": "no reports in these shards"}
    similarity = features.image_global @ features.report_global.T
    recalls = retrieval_recall(similarity, ks=(1, 5, 10))
    return {direction: {f"R@{k}": v for k, v in values.items()} for direction, values in recalls.items()} | {
        "n": len(features)}


def _seeded_subset(n: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """A fixed random subset of round(n * fraction) indices (at least 2, and both classes when binary)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    count = max(2, int(round(n * fraction)))
    chosen = order[:count]
    if labels is not None and labels.ndim == 1 and len(np.unique(labels[chosen])) < 2:
        for value in np.unique(labels):
            if value not in labels[chosen]:
                chosen = np.append(chosen, order[np.nonzero(labels[order] == value)[0][0]])
    return np.sort(chosen)


def train_logistic_regression(x: np.ndarray, y: np.ndarray, weight_decay: float = 1e-4, steps: int = 200,
                              seed: int = 0) -> torch.nn.Linear:
    """Multi-label logistic regression (BCE, L2) with L-BFGS on standardised frozen features; NaN targets ignored."""
    torch.manual_seed(seed)
    features = torch.from_numpy(x).float()
    targets = torch.from_numpy(y).float()
    known = ~torch.isnan(targets)
    targets = torch.nan_to_num(targets)
    head = torch.nn.Linear(features.shape[1], targets.shape[1])
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(features), targets, reduction="none")
        loss = (loss * known).sum() / known.sum().clamp_min(1) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def linear_probe(train: EvalFeatures, test: EvalFeatures, classes: list[str], seed: int = 0) -> dict[str, Any]:
    """Few-shot linear probe on frozen image features at 1%, 10%, 100% of the training labels; AUC."""
    y_train = np.stack([binary_labels(train, c) for c in classes], 1)
    y_test = np.stack([binary_labels(test, c) for c in classes], 1)
    usable = [i for i, c in enumerate(classes)
              if len(np.unique(y_train[~np.isnan(y_train[:, i]), i])) == 2
              and len(np.unique(y_test[~np.isnan(y_test[:, i]), i])) == 2]
    if not usable:
        return {"skipped": "no class has both labels in train and test"}
    names = [classes[i] for i in usable]
    y_train, y_test = y_train[:, usable], y_test[:, usable]
    mean, std = train.image_embedding.mean(0), train.image_embedding.std(0) + 1e-6
    x_train = (train.image_embedding - mean) / std
    x_test = (test.image_embedding - mean) / std
    results: dict[str, Any] = {"classes": names}
    for fraction in FEW_SHOT_FRACTIONS:
        subset = _seeded_subset(len(train), fraction, seed, y_train[:, 0] if len(names) == 1 else None)
        head = train_logistic_regression(x_train[subset], y_train[subset], seed=seed)
        with torch.no_grad():
            scores = torch.sigmoid(head(torch.from_numpy(x_test).float())).numpy()
        aucs = multilabel_auc(scores, np.nan_to_num(y_test, nan=-1.0), names)
        results[f"{int(fraction * 100)}%"] = {"mean_auc": aucs.mean, "per_class": aucs.per_class,
                                              "train_images": int(len(subset))}
    return results


def _mask_channels(masks: list[np.ndarray | None], channels: list[int] | None,
                   like: np.ndarray | None = None) -> np.ndarray:
    """(N, C, H, W) float targets: bit channels of 16-bit region masks, or one binary channel.

    An image without a mask (None) gets empty channels shaped like ``like`` (default: the first mask)."""
    like = next(x for x in masks if x is not None) if like is None else like
    stacked = np.stack([m if m is not None else np.zeros_like(like) for m in masks])
    if channels is None:
        return (stacked > 0).astype(np.float32)[:, None]
    return np.stack([((stacked >> bit) & 1).astype(np.float32) for bit in channels], 1)


class SegmentationHead(torch.nn.Module):
    """Light decoder on frozen patch tokens: 3x3 conv, ReLU, 1x1 conv on the patch grid, bilinear upsampling."""

    def __init__(self, width: int, channels: int, grid: tuple[int, int], image_size: int, hidden: int = 64):
        super().__init__()
        self.grid, self.image_size = grid, image_size
        self.net = torch.nn.Sequential(torch.nn.Conv2d(width, hidden, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(hidden, channels, 1))

    def forward(self, tokens: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Logits (B, C, size, size); ``size`` defaults to the image size."""
        b, k, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, d, *self.grid)
        size = self.image_size if size is None else size
        return F.interpolate(self.net(grid), size=(size, size), mode="bilinear", align_corners=False)


def loss_resolution(grid: tuple[int, int], image_size: int) -> int:
    """Side of the soft targets a segmentation head trains against: 4x the patch grid, at most the image.

    The head predicts on the patch grid and upsamples bilinearly, so targets finer than a few pixels per
    patch add cost (the loss over full-size masks was most of an evaluation's time), not information."""
    return min(image_size, 4 * max(grid))


def _soft_targets(masks: list[np.ndarray | None], channels: list[int] | None, size: int,
                  chunk: int = 256) -> torch.Tensor:
    """(N, C, size, size) float: the mask channels area-averaged to ``size`` (the fraction of each cell covered),
    built in chunks so the full-resolution float masks of a large split never exist at once."""
    like = next(x for x in masks if x is not None)
    parts = [F.interpolate(torch.from_numpy(_mask_channels(masks[i:i + chunk], channels, like)), size=(size, size),
                           mode="area") for i in range(0, len(masks), chunk)]
    return torch.cat(parts)


def _images_to_tensor(images: np.ndarray, in_chans: int) -> torch.Tensor:
    """Stored uint8 (N, 1, H, W) evaluation images -> the model's normalised input."""
    from mlip_dist.data.batch import normalize_pixels

    return normalize_pixels(torch.from_numpy(images), in_chans)


def segmentation(train: EvalFeatures, test: EvalFeatures, *, grid: tuple[int, int], image_size: int,
                 channels: list[int] | None, channel_names: list[str], epochs: int = 60, seed: int = 0,
                 encoder: torch.nn.Module | None = None, encoder_lr: float = 1e-4,
                 device: torch.device | str | None = None) -> dict[str, Any]:
    """Few-shot segmentation at 1%, 10%, 100% of the training masks; Dice on the test split.

    ``encoder=None``: frozen encoder (precomputed patch tokens) + light head. With an image encoder, a copy
    of it is fine-tuned with the head for each fraction (needs ``EvalFeatures.images``).
    Dice is averaged over (test image, channel) pairs whose ground truth is non-empty, at full resolution;
    the heads train against the masks area-averaged to ``loss_resolution(grid, image_size)``.
    The heads train on ``device`` (default: the encoder's, else the CPU).
    """
    import copy

    if not any(m is not None for m in train.masks):
        return {"skipped": "no masks in these shards"}
    if encoder is None and train.patch_tokens is None:
        return {"skipped": "no patch tokens extracted"}
    if encoder is not None and (train.images is None or test.images is None):
        return {"skipped": "fine-tuning needs the images (extract with with_images=True)"}
    if device is None:
        device = next(encoder.parameters()).device if encoder is not None else torch.device("cpu")
    train_size = loss_resolution(grid, image_size)
    y_train = _soft_targets(train.masks, channels, train_size).to(device)
    y_test = _mask_channels(test.masks, channels)
    results: dict[str, Any] = {"channels": channel_names, "encoder": "frozen" if encoder is None else "fine-tuned"}
    for fraction in FEW_SHOT_FRACTIONS:
        subset = torch.from_numpy(_seeded_subset(len(train), fraction, seed))
        torch.manual_seed(seed)
        tuned = copy.deepcopy(encoder).train() if encoder is not None else None

        def tokens(features: EvalFeatures, index: torch.Tensor, tuned: torch.nn.Module | None = tuned) -> torch.Tensor:
            if tuned is None:
                return torch.from_numpy(features.patch_tokens[index.numpy()].astype(np.float32)).to(device)
            images = _images_to_tensor(features.images[index.numpy()], tuned.config.in_chans).to(device)
            return tuned(images, mask_ratio=0.0).patch_tokens

        width = tuned.embed_dim if tuned is not None else train.patch_tokens.shape[-1]
        head = SegmentationHead(width, y_train.shape[1], grid, image_size).to(device)
        groups = [{"params": head.parameters(), "lr": 3e-3}]
        if tuned is not None:
            groups.append({"params": tuned.parameters(), "lr": encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
        positives = y_train[subset].mean().clamp(1e-3, 0.5)
        pos_weight = ((1 - positives) / positives).clamp(max=20.0)
        for _ in range(epochs):
            for start in range(0, len(subset), 16):
                index = subset[start:start + 16]
                logits = head(tokens(train, index), size=train_size)
                target = y_train[index.to(device)]
                probs = torch.sigmoid(logits)
                dice = 1 - (2 * (probs * target).sum((2, 3)) + 1) / (probs.sum((2, 3)) + target.sum((2, 3)) + 1)
                loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight) + dice.mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if tuned is not None:
            tuned.eval()
        with torch.no_grad():
            predictions = torch.sigmoid(torch.cat([head(tokens(test, torch.arange(i, min(i + 32, len(test)))))
                                                   for i in range(0, len(test), 32)])).cpu().numpy()
        present = y_test.reshape(*y_test.shape[:2], -1).any(-1)
        evaluated = [c for c in range(y_test.shape[1]) if present[:, c].any()]
        per_channel = {channel_names[c]: mean_dice(predictions[present[:, c], c], y_test[present[:, c], c])
                       for c in evaluated}
        weights = [int(present[:, c].sum()) for c in evaluated]
        results[f"{int(fraction * 100)}%"] = {
            "dice": float(np.average(list(per_channel.values()), weights=weights)) if evaluated else float("nan"),
            "per_channel": per_channel, "train_images": int(len(subset)),
        }
    return results


def _point_and_overlap(heat: np.ndarray, region: np.ndarray) -> tuple[bool, float, float]:
    """Pointing game hit, IoU and the hit chance of one patch-grid heat map against a pixel region mask.

    The predicted region is the set of patches holding more than the uniform share of the heat. The
    chance (``metrics.pointing_game_chance``) is the hit rate of an arg-max drawn uniformly over the
    patches: the level a heat map that knows nothing about the image reaches on average."""
    hit = bool(pointing_game(heat[None], region[None])[0])
    cell = (region.shape[0] // heat.shape[0], region.shape[1] // heat.shape[1])
    predicted = np.kron(heat > heat.sum() / heat.size, np.ones(cell)).astype(bool)
    union = (predicted | region).sum()
    chance = pointing_game_chance(heat.shape, region)
    return hit, float((predicted & region).sum() / union) if union else 1.0, chance


def _grounding_summary(scores: list[tuple[bool, float, float]], examples: list[Any], unit: str) -> dict[str, Any]:
    if not scores:
        return {"skipped": f"no {unit} with a ground-truth region"}
    return {"pointing_game": float(np.mean([hit for hit, _, _ in scores])),
            "iou": float(np.mean([iou for _, iou, _ in scores])),
            "pointing_game_chance": float(np.mean([chance for _, _, chance in scores])),
            unit: len(scores), "_examples": examples}


def grounding(features: EvalFeatures, *, grid: tuple[int, int], label_bits: dict[str, int], eps: float,
              max_iter: int, tol: float, keep_maps: int = 0) -> dict[str, Any]:
    """Each sentence's OT row over the image's patches as a heat map (METHOD.md, Evaluation: Grounding);
    pointing game and IoU against the region mask of the findings that sentence describes (synthetic data)."""
    if features.sentence_features is None or features.patch_features is None:
        return {"skipped": "no reports or patch features"}
    patches = torch.from_numpy(features.patch_features).float()
    sentences = torch.from_numpy(features.sentence_features).float()
    sentence_mask = torch.from_numpy(features.sentence_mask)
    plans = paired_plans(patches, sentences, None, sentence_mask, eps, max_iter, tol).numpy()  # (N, K, S)
    scores, examples = [], []
    for index, meta in enumerate(features.meta):
        mask = features.masks[index]
        sentence_findings = meta.get("sentence_findings")
        if mask is None or not sentence_findings:
            continue
        for slot, findings in enumerate(sentence_findings[: plans.shape[2]]):
            bits = [label_bits[f] for f in findings if f in label_bits]
            if not bits or not sentence_mask[index, slot]:
                continue
            region = np.zeros(mask.shape, dtype=bool)
            for bit in bits:
                region |= ((mask >> bit) & 1).astype(bool)
            if not region.any():
                continue
            heat = plans[index, :, slot].reshape(grid)
            scores.append(_point_and_overlap(heat, region))
            if len(examples) < keep_maps:
                examples.append((index, meta["sentences"][slot], heat, region))
    return _grounding_summary(scores, examples, "sentences")


def prompt_grounding(features: EvalFeatures, prompt: PromptFeatures, *, class_name: str, grid: tuple[int, int],
                     eps: float, max_iter: int, tol: float, keep_maps: int = 0) -> dict[str, Any]:
    """Benchmarks without reports (RSNA boxes, SIIM masks): the OT plan between each image's patches and the
    class's positive + negative prompt sentences; a patch's heat is the mass it sends to the positive prompts.
    Pointing game and IoU on the images whose region mask is non-empty."""
    if features.patch_features is None:
        return {"skipped": "no patch features"}
    prompts = np.concatenate([prompt.positive_sentence, prompt.negative_sentence])
    patches = torch.from_numpy(features.patch_features).float()
    prompt_t = torch.from_numpy(prompts).float()[None].expand(patches.shape[0], -1, -1)
    plans = paired_plans(patches, prompt_t, None, None, eps, max_iter, tol).numpy()
    heats = plans[:, :, : len(prompt.positive_sentence)].sum(-1)  # (N, K)
    scores, examples = [], []
    for index, mask in enumerate(features.masks):
        if mask is None or not (mask > 0).any():
            continue
        heat = heats[index].reshape(grid)
        scores.append(_point_and_overlap(heat, mask > 0))
        if len(examples) < keep_maps:
            examples.append((index, f"{class_name} (positive prompts)", heat, mask > 0))
    return _grounding_summary(scores, examples, "images")
