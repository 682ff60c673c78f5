"""TensorBoard heat maps: for fixed held-out pairs, each sentence's OT transport row over its X-ray.

Every rank runs the same forward (collectives under ZeRO-3 need all ranks); rank 0 writes.
METHOD.md, Losses 3 (the plan T*_ii between the image's patches and its report's sentences) and
Evaluation: Grounding.
"""

from __future__ import annotations

from typing import Any

import torch

from mlip_dist.config import MLIPConfig
from mlip_dist.data import remote
from mlip_dist.data.loader import (
    AugmentConfig,
    Collator,
    decode_sample,
    iterate_tar_samples,
    read_dataset_info,
)
from mlip_dist.losses.local_ot import paired_plans
from mlip_dist.viz import overlay, patch_heatmap


def sentence_patch_plans(model: Any, batch: Any, eps: float, max_iter: int, tol: float) -> torch.Tensor:
    """OT plans (B, K, S) between all patches of each unmasked image and its own report's sentences."""
    image = model.encode_image(batch.images, mask_ratio=0.0)
    text = model.encode_text(batch.input_ids, batch.attention_mask, batch.sentence_spans, batch.sentence_mask)
    return paired_plans(image.patch_features, text.sentence_features, None, text.sentence_mask, eps, max_iter, tol)


class HeatmapLogger:
    def __init__(self, config: MLIPConfig, tokenizer: Any, device: torch.device, split: str, num_pairs: int = 4):
        data = config.data
        info = read_dataset_info(data.shards, split, timeout_s=data.fetch_timeout_s, retries=data.fetch_retries)
        augment = AugmentConfig(image_size=config.model.image.image_size, in_chans=config.model.image.in_chans,
                                enabled=False)
        shard = info.shards[0]
        cache = remote.cache_for(data.shards, dataset_json=info.dataset_json, cache_dir=data.cache_dir,
                                 max_bytes=data.cache_max_bytes, timeout_s=data.fetch_timeout_s,
                                 retries=data.fetch_retries)
        if cache is not None:  # a remote base: its first shard, fetched whole into the cache
            try:
                shard = str(cache.local_path(shard))
            except remote.FetchError as exc:  # heat maps are optional: the trainer logs this and goes on
                raise FileNotFoundError(str(exc)) from exc
        samples = []
        for raw in iterate_tar_samples(shard, lambda shard, exc: None):
            try:
                samples.append(decode_sample(raw, augment, generator=None))
            except ValueError:
                continue
            if len(samples) == num_pairs:
                break
        collate = Collator(tokenizer, config.model.text.max_length, config.model.max_sentences)
        self.batch = collate(samples).to(device)
        self.sentences = [s.sentences for s in samples]
        self.loss_config = config.loss
        self.device = device

    @torch.no_grad()
    def log(self, model: Any, writer: Any, step: int) -> None:
        model.eval()
        dtype = next(model.parameters()).dtype
        batch = self.batch.to(self.device, dtype=dtype if dtype == torch.bfloat16 else None)
        plans = sentence_patch_plans(model, batch, self.loss_config.ot_epsilon, self.loss_config.ot_max_iter,
                                     self.loss_config.ot_tol)
        if writer is None:
            return
        grid = model.image_encoder.grid_size
        size = tuple(batch.images.shape[-2:])
        for index, sentences in enumerate(self.sentences):
            for slot in range(int(batch.sentence_mask[index].sum())):
                heat = patch_heatmap(plans[index, :, slot], grid, size)
                caption = sentences[slot]
                picture = overlay(batch.images[index].float().cpu(), heat.cpu(), caption)
                writer.image(f"ot_heatmap/pair{index}/sentence{slot}", picture, step, caption=caption)
