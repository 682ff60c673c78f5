"""The batch the loader yields and the model consumes (docs/ARCHITECTURE.md, Batch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MLIPBatch:
    """A collated batch of image/report pairs.

    ``sentence_spans[b, s] = (start, end)`` are token positions ``[start, end)`` of sentence ``s``
    of report ``b`` in ``input_ids``; padded sentences have ``(0, 0)`` and ``sentence_mask`` False.
    """

    images: torch.Tensor  # (B, C, H, W) float
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long
    sentence_spans: torch.Tensor  # (B, S, 2) long
    sentence_mask: torch.Tensor  # (B, S) bool
    keys: list[str] = field(default_factory=list)
    # (B,) int64 seeds of each sample's patch mask, set by the training loader from the sample's place in the
    # global order, so masking does not depend on the rank layout; None: masks from the global torch RNG.
    mask_seeds: torch.Tensor | None = None
    # Loader faults met while building this batch (each replaced by a substitute sample, so the batch is full):
    num_skipped: int = 0  # corrupt samples (undecodable image, bad JSON, no sentences)
    num_lost: int = 0  # positions that did not exist: their shard is cut or unreadable
    shard_errors: list[str] = field(default_factory=list)  # the shards of the lost positions

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MLIPBatch:
        return MLIPBatch(
            images=self.images.to(device=device, dtype=dtype or self.images.dtype, non_blocking=True),
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            sentence_spans=self.sentence_spans.to(device, non_blocking=True),
            sentence_mask=self.sentence_mask.to(device, non_blocking=True),
            keys=self.keys,
            mask_seeds=self.mask_seeds,
            num_skipped=self.num_skipped,
            num_lost=self.num_lost,
            shard_errors=list(self.shard_errors),
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])
