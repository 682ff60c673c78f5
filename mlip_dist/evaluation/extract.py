"""Frozen-feature extraction over evaluation shards, each rank over its share, gathered on every rank.

Works for both kinds of shards: ``tools/make_shards.py`` output (MIMIC-CXR / synthetic: reports, CheXpert
labels, and for synthetic data ``regions.png`` + ``sentence_findings``) and ``tools/make_eval_shards.py``
output (CheXpert 5x200, RSNA, SIIM: class labels, ``mask.png``, boxes). Features are computed unmasked,
without augmentation, so they do not depend on which rank computed them (METHOD.md, Evaluation).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mlip_dist.data import remote
from mlip_dist.data.loader import (
    AugmentConfig,
    SplitInfo,
    count_shard_samples,
    decode_image,
    iterate_tar_samples,
    preprocess_image,
    read_dataset_info,
)
from mlip_dist.text.tokenize import tokenize_with_spans

logger = logging.getLogger(__name__)


@dataclass
class EvalFeatures:
    """Per-sample features of one split, sorted by key. Optional parts are None when not requested."""

    keys: list[str]
    meta: list[dict[str, Any]]
    image_global: np.ndarray  # (N, d) projected, normalised
    image_embedding: np.ndarray  # (N, D) encoder pooled embedding (linear probe input)
    patch_features: np.ndarray | None = None  # (N, K, d) projected patch features
    patch_tokens: np.ndarray | None = None  # (N, K, D) encoder patch tokens (segmentation input), float16
    report_global: np.ndarray | None = None  # (N, d)
    sentence_features: np.ndarray | None = None  # (N, S, d)
    sentence_mask: np.ndarray | None = None  # (N, S) bool
    masks: list[np.ndarray | None] = field(default_factory=list)  # region masks at the model's image size
    images: np.ndarray | None = None  # (N, 1, H, W) uint8 model-size images (segmentation fine-tuning)

    def __len__(self) -> int:
        return len(self.keys)


def _decode_mask(data: bytes, size: int) -> np.ndarray:
    """A stored mask (8-bit 0/255 or 16-bit bit flags) resized (nearest) to size x size, like the image."""
    import torchvision.transforms.v2.functional as TF

    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img).astype(np.int64)
    tensor = torch.from_numpy(array)[None]
    return TF.resize(tensor, [size, size], interpolation=TF.InterpolationMode.NEAREST)[0].numpy()


def split_subset(shard_dir: str, split: str, max_samples: int | None = None,
                 cache: remote.ShardCache | None = None) -> list[tuple[str, int | None]]:
    """(shard, samples to read or None for all) of ``split``: every shard, or with ``max_samples`` the first
    ``max_samples`` samples in ``dataset.json`` order, the same set whatever the world size. Shards of a
    remote base are URLs (counting them, for an old dataset.json, fetches them into ``cache``)."""
    info = read_dataset_info(shard_dir, split)
    if cache is None and max_samples is not None and info.shard_samples is None:
        cache = remote.cache_for(shard_dir, dataset_json=info.dataset_json)
    return _subset(info, max_samples, cache)


def _subset(info: SplitInfo, max_samples: int | None, cache: remote.ShardCache | None) -> list[tuple[str, int | None]]:
    if max_samples is None:
        return [(shard, None) for shard in info.shards]
    counts = info.shard_samples if info.shard_samples is not None else count_shard_samples(info.shards, cache)
    subset, left = [], max_samples
    for shard, count in zip(info.shards, counts, strict=True):
        if left <= 0:
            break
        subset.append((shard, min(count, left)))
        left -= count
    return subset


def iterate_split(shard_dir: str, split: str, rank: int, world_size: int, max_samples: int | None = None,
                  cache: remote.ShardCache | None = None):
    """Raw samples of this rank's shards of ``split`` (shards dealt round-robin by rank), of the subset of
    :func:`split_subset`. Shards of a remote base are fetched whole into ``cache`` (default
    :func:`remote.cache_for` with :func:`remote.configure`'s settings) and read from there; one that cannot
    be fetched is logged and skipped, like an unreadable local shard."""
    info = read_dataset_info(shard_dir, split)
    if cache is None:
        cache = remote.cache_for(shard_dir, dataset_json=info.dataset_json)
    for shard, quota in _subset(info, max_samples, cache)[rank::world_size]:
        path = shard
        if cache is not None:
            try:
                path = str(cache.local_path(shard))
            except remote.FetchError as exc:
                logger.warning("skipping shard %s: %s", shard, exc)
                continue
        try:
            yield from itertools.islice(iterate_tar_samples(path, lambda s, exc: None), quota)
        finally:
            if cache is not None:
                cache.release()


def _sentences(meta: dict[str, Any]) -> list[str] | None:
    sentences = [s for s in meta.get("sentences", []) if s.strip()]
    return sentences or None


@torch.no_grad()
def extract_features(
    model: Any,
    tokenizer: Any,
    shard_dir: str,
    split: str,
    *,
    image_size: int,
    in_chans: int,
    max_length: int,
    max_sentences: int,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    with_patches: bool = True,
    with_patch_tokens: bool = False,
    with_images: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """This rank's features of ``split`` (or of its first ``max_samples`` samples, :func:`split_subset`) as plain
    arrays/lists (to be gathered with ``gather_features``)."""
    from tqdm import tqdm

    augment = AugmentConfig(image_size=image_size, in_chans=in_chans, enabled=False)
    out: dict[str, list[Any]] = {k: [] for k in ("keys", "meta", "image_global", "image_embedding", "patch_features",
                                                 "patch_tokens", "report_global", "sentence_features",
                                                 "sentence_mask", "masks", "images")}
    batch: list[tuple[str, torch.Tensor, dict[str, Any], np.ndarray | None]] = []

    def flush() -> None:
        images = torch.stack([item[1] for item in batch]).to(device)
        encoded = model.image_encoder(images, mask_ratio=0.0)
        out["image_embedding"].append(encoded.global_embedding.float().cpu().numpy())
        out["image_global"].append(model.image_global_proj(encoded.global_embedding).float().cpu().numpy())
        if with_patches:
            out["patch_features"].append(model.patch_proj(encoded.patch_tokens).float().cpu().numpy())
        if with_patch_tokens:
            out["patch_tokens"].append(encoded.patch_tokens.half().cpu().numpy())
        sentence_lists = [_sentences(item[2]) for item in batch]
        if all(s is not None for s in sentence_lists):
            tokens = tokenize_with_spans(tokenizer, sentence_lists, max_length, max_sentences)
            text = model.encode_text(*(t.to(device) for t in tokens))
            out["report_global"].append(text.report_features.float().cpu().numpy())
            out["sentence_features"].append(text.sentence_features.float().cpu().numpy())
            out["sentence_mask"].append(text.sentence_mask.cpu().numpy())
        if with_images:  # stored as uint8 in [0, 1] before normalisation, to keep memory small
            from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD

            pixels = (images[:, :1].cpu() * IMAGE_STD + IMAGE_MEAN).clamp(0, 1)
            out["images"].append((pixels * 255).round().to(torch.uint8).numpy())
        for key, _, meta, mask in batch:
            out["keys"].append(key)
            out["meta"].append(meta)
            out["masks"].append(mask)
        batch.clear()

    samples = iterate_split(shard_dir, split, rank, world_size, max_samples)
    for raw in tqdm(samples, desc=f"features {split} (rank {rank})", disable=not progress or rank != 0, unit="img"):
        key = raw.get("__key__", "?")
        image_bytes = raw.get("png", raw.get("jpg"))
        if image_bytes is None or "json" not in raw:
            continue
        meta = json.loads(raw["json"])
        image = preprocess_image(decode_image(image_bytes), augment, generator=None)
        mask_bytes = raw.get("regions.png", raw.get("mask.png"))
        mask = _decode_mask(mask_bytes, image_size) if mask_bytes is not None else None
        batch.append((key, image, meta, mask))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return {k: (np.concatenate(v) if v and isinstance(v[0], np.ndarray) and k not in ("masks",) else v)
            for k, v in out.items()}


def gather_features(local: dict[str, Any], world_size: int) -> EvalFeatures:
    """All ranks' features, concatenated and sorted by key (identical on every rank)."""
    parts = [local]
    if world_size > 1:
        import torch.distributed as dist

        parts = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, local)
    keys = [k for part in parts for k in part["keys"]]
    order = np.argsort(np.array(keys), kind="stable")

    def join(name: str) -> np.ndarray | None:
        arrays = [p[name] for p in parts if isinstance(p[name], np.ndarray) and len(p[name])]
        if not arrays or sum(len(a) for a in arrays) != len(keys):
            return None
        return np.concatenate(arrays)[order]

    def join_list(name: str) -> list[Any]:
        values = [v for p in parts for v in p[name]]
        return [values[i] for i in order]

    image_global = join("image_global")
    if image_global is None:
        raise ValueError("no evaluation samples were read")
    return EvalFeatures(
        keys=[keys[i] for i in order], meta=join_list("meta"), image_global=image_global,
        image_embedding=join("image_embedding"), patch_features=join("patch_features"),
        patch_tokens=join("patch_tokens"), report_global=join("report_global"),
        sentence_features=join("sentence_features"), sentence_mask=join("sentence_mask"), masks=join_list("masks"),
        images=join("images"),
    )
