#!/usr/bin/env python
"""How fast can an image encoder learn the findings? Supervised upper bound, linear vs conv patch stem.

    OMP_NUM_THREADS=1 python tools/bench_image_encoder.py --shards runs/big/shards \
        [--config mlip_dist/configs/study_fast.yaml] [--steps 2000] [--mask-ratio 0.0] [--stems linear conv]

For each stem, in one process with the same seed, data order and budget: the config's image encoder plus a
linear head is trained with binary cross-entropy on the CheXpert labels of the train split (uncertain labels
ignored, unmentioned = negative), batches of 32 with the training augmentation, AdamW and the config's
learning rate on a cosine schedule; then the mean test AUC over the findings with positives in both splits
is printed, with each finding's (No Finding left out, as in evaluate.py's zero-shot). A contrastive model's zero-shot AUC cannot beat what its encoder reaches
with every label at the same budget, so this is the ceiling the validation study works under
(docs/RESULTS.md, "Image encoder"). ``--mask-ratio`` trains on masked views (evaluation is unmasked).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlip_dist.config import PatchStem, load_config  # noqa: E402
from mlip_dist.data.loader import (  # noqa: E402
    AugmentConfig,
    decode_image,
    iterate_tar_samples,
    preprocess_image,
    read_dataset_info,
)
from mlip_dist.data.mimic import CHEXPERT_LABELS  # noqa: E402
from mlip_dist.evaluation.metrics import roc_auc  # noqa: E402
from mlip_dist.evaluation.tasks import chexpert_target  # noqa: E402
from mlip_dist.models.image_encoder import ImageEncoder  # noqa: E402
from mlip_dist.training.schedule import cosine_with_warmup  # noqa: E402


def read_split(shards: Path, split: str) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decoded images (1, H, W) in [0, 1] and (N, 14) labels: 1, 0 (negative or not mentioned), NaN (uncertain)."""
    images, labels = [], []
    for shard in read_dataset_info(shards, split).shards:
        for sample in iterate_tar_samples(shard, on_error=lambda name, err: print(f"skipped in {name}: {err}")):
            meta = json.loads(sample["json"])
            images.append(decode_image(sample.get("png", sample.get("jpg"))))
            labels.append([chexpert_target(meta["labels"].get(name)) for name in CHEXPERT_LABELS])
    return images, np.array(labels, dtype=np.float64)


def train_and_test(config, train, test, *, steps: int, lr: float, mask_ratio: float, seed: int) -> dict[str, float]:
    (train_images, train_labels), (test_images, test_labels) = train, test
    usable = [i for i in range(len(CHEXPERT_LABELS)) if CHEXPERT_LABELS[i] != "No Finding"  # as evaluate.py
              and len(np.unique(train_labels[~np.isnan(train_labels[:, i]), i])) == 2
              and len(np.unique(test_labels[~np.isnan(test_labels[:, i]), i])) == 2]
    torch.manual_seed(seed)
    encoder = ImageEncoder(config).train()
    head = torch.nn.Linear(encoder.embed_dim, len(usable))
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    targets = torch.from_numpy(train_labels[:, usable]).float()
    augment = AugmentConfig(image_size=config.image_size, in_chans=config.in_chans)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_with_warmup(step, warmup_steps=30, max_steps=steps, base_lr=lr, min_lr=lr / 100)
        index = torch.randint(len(train_images), (32,), generator=generator)
        images = torch.stack([preprocess_image(train_images[i], augment, generator) for i in index])
        target = targets[index]
        known = ~torch.isnan(target)
        logits = head(encoder(images, mask_ratio=mask_ratio).global_embedding)
        loss = (F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none") * known).sum()
        loss = loss / known.sum().clamp_min(1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    encoder.eval()
    view = dataclasses.replace(augment, enabled=False)
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(head(encoder(torch.stack([preprocess_image(x, view, None) for x in
                                                                    test_images[i:i + 64]]), mask_ratio=0.0)
                                               .global_embedding)) for i in range(0, len(test_images), 64)]).numpy()
    aucs = {}
    for column, label in enumerate(usable):
        known = ~np.isnan(test_labels[:, label])
        aucs[CHEXPERT_LABELS[label]] = roc_auc(scores[known, column], test_labels[known, label])
    return {"mean": float(np.mean(list(aucs.values()))), "seconds_per_step": seconds / steps, **aucs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "mlip_dist" /
                        "configs" / "study_fast.yaml")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--mask-ratio", type=float, default=0.0)
    parser.add_argument("--stems", nargs="+", default=["linear", "conv"], choices=[s.value for s in PatchStem])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    train, test = read_split(args.shards, config.data.train_split), read_split(args.shards, "test")
    print(f"{len(train[0])} train / {len(test[0])} test images; {config.model.image.image_size} px, patch "
          f"{config.model.image.patch_size}, width {config.model.image.width}, depth {config.model.image.depth}; "
          f"{args.steps} steps of 32, lr {config.train.lr}, mask ratio {args.mask_ratio}; "
          f"{torch.get_num_threads()} thread(s)")
    results = {}
    for stem in args.stems:
        image_config = dataclasses.replace(config.model.image, stem=PatchStem(stem))
        results[stem] = train_and_test(image_config, train, test, steps=args.steps, lr=config.train.lr,
                                       mask_ratio=args.mask_ratio, seed=args.seed)
        per_class = ", ".join(f"{k} {v:.3f}" for k, v in results[stem].items() if k not in ("mean", "seconds_per_step"))
        print(f"stem {stem}: mean test AUC {results[stem]['mean']:.3f} ({results[stem]['seconds_per_step']:.3f} s "
              f"a step)\n  {per_class}", flush=True)
    if len(results) > 1:
        first, *others = args.stems
        for stem in others:
            print(f"{stem} vs {first}: AUC {results[stem]['mean'] - results[first]['mean']:+.3f}, time "
                  f"{results[stem]['seconds_per_step'] / results[first]['seconds_per_step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
