"""The batch the loader yields and the model consumes (docs/ARCHITECTURE.md, Batch)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

# Grayscale pixels in [0, 1] are normalised as (x - IMAGE_MEAN) / IMAGE_STD and repeated to the model's channels.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.25

# The largest value of each compact pixel type (METHOD.md, Data: 8- or 16-bit grayscale as stored).
PIXEL_MAX = {torch.uint8: 255.0, torch.uint16: 65535.0}


def normalize_pixels(pixels: torch.Tensor, channels: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Compact pixels (B, 1, H, W) uint8/uint16 -> normalised float (B, channels, H, W), on their own device.

    The arithmetic is float32 whatever ``dtype`` is (the result is cast last), so a bf16 batch holds the same
    values as one normalised on the host in float32 and then cast.
    """
    if pixels.dtype not in PIXEL_MAX:
        raise TypeError(f"compact pixels must be uint8 or uint16, got {pixels.dtype}")
    images = (pixels.float() / PIXEL_MAX[pixels.dtype] - IMAGE_MEAN) / IMAGE_STD
    return images.to(dtype or torch.float32).expand(-1, channels, -1, -1)


@dataclass
class MLIPBatch:
    """A collated batch of image/report pairs.

    ``images`` is either normalised float (B, C, H, W), as the model takes it, or compact pixels (B, 1, H, W)
    uint8/uint16 as the training loader ships them (12x / 6x fewer bytes than 3-channel float32 through the
    worker queues, pinned memory and the host-to-device copy); :meth:`to` normalises compact pixels on the
    target device and repeats them to ``channels``.
    ``sentence_spans[b, s] = (start, end)`` are token positions ``[start, end)`` of sentence ``s``
    of report ``b`` in ``input_ids``; padded sentences have ``(0, 0)`` and ``sentence_mask`` False.
    """

    images: torch.Tensor  # (B, C, H, W) float, or (B, 1, H, W) uint8/uint16 compact pixels
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
    channels: int = 3  # the model's input channels (compact pixels are repeated to these by ``to``)

    @property
    def compact(self) -> bool:
        """The images are compact pixels, not yet normalised."""
        return not self.images.is_floating_point()

    def _tensors(self) -> list[str]:
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MLIPBatch:
        """This batch on ``device`` (non-blocking copies), images as the model takes them: compact pixels are
        normalised there (:func:`normalize_pixels`), float images cast to ``dtype`` when one is given."""
        moved = {name: getattr(self, name).to(device, non_blocking=True) for name in self._tensors()
                 if name != "mask_seeds"}
        images = moved["images"]
        moved["images"] = (normalize_pixels(images, self.channels, dtype) if self.compact
                           else images.to(dtype or images.dtype))
        return replace(self, **moved, shard_errors=list(self.shard_errors))

    def pin_memory(self) -> MLIPBatch:
        """A copy in page-locked host memory (the DataLoader calls this with ``pin_memory=True``), so that the
        host-to-device copy is asynchronous and can overlap the step before it."""
        return replace(self, **{name: getattr(self, name).pin_memory() for name in self._tensors()})

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark this (device) batch's tensors as used on ``stream`` (a batch copied on a side stream)."""
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor.device.type == "cuda":
                tensor.record_stream(stream)

    def __len__(self) -> int:
        return int(self.images.shape[0])
