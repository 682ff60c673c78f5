"""Batches on the device one step ahead: the next batch's host-to-device copy overlaps the current step.

On a CUDA device the copy (and the normalisation of compact pixels, :meth:`MLIPBatch.to`) of batch ``n + 1`` is
issued on a side stream as soon as batch ``n`` is handed out, so it runs while step ``n`` computes; from pinned
memory (``build_train_loader(pin_memory=True)``) the copy is asynchronous. Before a batch is handed out the
compute stream waits for its copy (a device-side wait, no host sync) and the batch's tensors are recorded on the
compute stream, so the caching allocator does not reuse them early. On other devices the same code runs without
the side stream (the copy is synchronous there; reading one batch ahead changes nothing else).

The loader is read one batch ahead: a run that stops after step ``n`` has drawn batch ``n + 1`` and never
used it, which costs nothing for resume (the loader restarts at the step count, not at its last draw).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class DevicePrefetcher:
    """Iterate ``batches`` (objects with ``to(device, dtype=)``) as batches on ``device``, one copy ahead."""

    def __init__(self, batches: Iterator[Any], device: torch.device, image_dtype: torch.dtype | None = None):
        self.batches = batches
        self.device = torch.device(device)
        self.image_dtype = image_dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._next: Any = None
        self._exhausted = False

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _issue(self) -> None:
        """Draw the next batch and start its copy (on the side stream on CUDA)."""
        try:
            batch = next(self.batches)
        except StopIteration:
            self._next, self._exhausted = None, True
            return
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            self._next = batch.to(self.device, dtype=self.image_dtype)

    def __next__(self) -> Any:
        if self._next is None and not self._exhausted:
            self._issue()
        if self._exhausted:
            raise StopIteration
        batch = self._next
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            batch.record_stream(compute)
        self._issue()
        return batch
