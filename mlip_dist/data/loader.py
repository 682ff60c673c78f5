"""Streaming training loader over the WebDataset shards of ``tools/make_shards.py``.

Guarantees:
- Every rank yields exactly ``batches_per_epoch`` micro-batches per epoch, so ranks step in lockstep
  (epoch length comes from ``dataset.json`` counts: ``count // global_batch_size``). Shards are dealt
  to ranks then workers; a stream that runs out before the epoch ends cycles its shards again.
- The stream is a deterministic function of (seed, epoch, rank, worker): a run resumed at batch ``b``
  skips raw (undecoded) samples up to ``b`` and then yields the same batches as an uninterrupted run.
- Corrupt samples (undecodable image, bad JSON, truncated tar member) are skipped, counted in
  ``MLIPBatch.num_skipped`` and logged with the shard name; they never stop the run.
- Fewer shards than ranks x workers raises ``NotEnoughShardsError`` (use ``data.resampled: true``),
  never a hang; more workers than batches per epoch are cut to one worker per batch.
- Workers ignore SIGTERM/SIGINT (the trainer checkpoints first, then stops them), so the loader's
  iterators are shut down by an exit hook: a process that ends without closing one (an exception, a
  global iterator) exits instead of waiting forever in multiprocessing's join of the workers.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import logging
import math
import random
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlip_dist.data.batch import MLIPBatch

logger = logging.getLogger(__name__)

IMAGE_MEAN = 0.5
IMAGE_STD = 0.25


class NotEnoughShardsError(ValueError):
    """Raised when a split has fewer shards than ranks x workers and resampling is off."""


@dataclass(frozen=True)
class SplitInfo:
    shards: list[str]  # absolute paths
    count: int


def read_dataset_info(shard_dir: str | Path, split: str) -> SplitInfo:
    """Read ``<shard_dir>/dataset.json`` and return the shard paths and sample count of ``split``."""
    shard_dir = Path(shard_dir)
    info_path = shard_dir / "dataset.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: pack shards first with tools/make_shards.py")
    info = json.loads(info_path.read_text())
    splits = info.get("splits", info)
    if split not in splits:
        raise KeyError(f"{info_path}: no split {split!r}; available: {', '.join(sorted(splits))}")
    entry = splits[split]
    shards = [str(shard_dir / name) for name in entry["shards"]]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{info_path}: {len(missing)} shard(s) listed but missing, e.g. {missing[0]}")
    return SplitInfo(shards=shards, count=int(entry["num_samples"]))


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class AugmentConfig:
    """Mild augmentation of METHOD.md (Data): random resized crop 0.8-1.0, small rotation, brightness/contrast."""

    image_size: int = 224
    in_chans: int = 3
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    max_rotation_deg: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1


def decode_image(data: bytes) -> torch.Tensor:
    """PNG (8/16-bit) or JPEG bytes -> float tensor (1, H, W) in [0, 1]."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I"):
            array = np.asarray(img, dtype=np.float32) / 65535.0
        else:
            array = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array))[None]


def preprocess_image(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Resize to ``image_size`` x ``image_size`` (augmented when a generator is given), normalise, repeat channels.

    Training: a random crop of 80-100 % of the area with the image's own aspect ratio, resized to the
    square (so the whole field is squeezed, not cut), a small rotation and brightness/contrast jitter.
    Without a generator: the whole image resized to the square, the centre of that distribution.
    """
    size = config.image_size
    _, height, width = image.shape
    if generator is not None and config.enabled:
        u = torch.rand(5, generator=generator).tolist()
        scale = config.crop_scale[0] + (config.crop_scale[1] - config.crop_scale[0]) * u[0]
        crop_h = max(1, int(round(height * math.sqrt(scale))))
        crop_w = max(1, int(round(width * math.sqrt(scale))))
        top = int(u[1] * (height - crop_h + 1))
        left = int(u[2] * (width - crop_w + 1))
        image = TF.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True)
        angle = (2 * u[3] - 1) * config.max_rotation_deg
        image = TF.rotate(image, angle)
        factors = torch.rand(2, generator=generator).tolist()
        image = TF.adjust_brightness(image, 1 + (2 * factors[0] - 1) * config.brightness)
        image = TF.adjust_contrast(image, 1 + (2 * factors[1] - 1) * config.contrast)
    else:
        # Evaluation: the whole image resized to size x size, the geometry of a training crop at scale 1
        # (training crops keep the image's aspect ratio and are resized to a square as well).
        image = TF.resize(image, [size, size], antialias=True)
    image = (image.clamp(0, 1) - IMAGE_MEAN) / IMAGE_STD
    return image.expand(config.in_chans, -1, -1).contiguous()


@dataclass
class DecodedSample:
    key: str
    image: torch.Tensor
    sentences: list[str]
    meta: dict[str, Any]


def decode_sample(sample: dict[str, Any], augment: AugmentConfig, generator: torch.Generator | None) -> DecodedSample:
    """Decode one raw webdataset sample; raises ValueError naming the key on any defect."""
    key = sample.get("__key__", "?")
    image_bytes = sample.get("png", sample.get("jpg"))
    if image_bytes is None:
        raise ValueError(f"sample {key}: no png or jpg member")
    if "json" not in sample:
        raise ValueError(f"sample {key}: no json member")
    meta = json.loads(sample["json"])
    sentences = [s for s in meta.get("sentences", []) if s.strip()]
    if not sentences:
        raise ValueError(f"sample {key}: no sentences")
    image = preprocess_image(decode_image(image_bytes), augment, generator)
    return DecodedSample(key=key, image=image, sentences=sentences, meta=meta)


class Collator:
    """Tokenise each report once with sentence spans (METHOD.md, Encoders: Text) and stack images."""

    def __init__(self, tokenizer: Any, max_length: int, max_sentences: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_sentences = max_sentences

    def __call__(self, samples: list[DecodedSample], num_skipped: int = 0) -> MLIPBatch:
        from mlip_dist.text.tokenize import tokenize_with_spans

        input_ids, attention_mask, spans, sentence_mask = tokenize_with_spans(
            self.tokenizer, [s.sentences for s in samples], self.max_length, self.max_sentences
        )
        return MLIPBatch(
            images=torch.stack([s.image for s in samples]),
            input_ids=input_ids,
            attention_mask=attention_mask,
            sentence_spans=spans,
            sentence_mask=sentence_mask,
            keys=[s.key for s in samples],
            num_skipped=num_skipped,
        )


def iterate_tar_samples(shard: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (bytes per member); a broken shard stops after its last good sample."""
    import webdataset as wds

    def handler(exc: Exception) -> bool:
        on_error(shard, exc)
        return True

    source = [{"url": shard}]
    yield from wds.tariterators.tarfile_samples(source, handler=handler)


class ShardStream(IterableDataset):
    """Per-rank stream of collated micro-batches; see the module docstring for its guarantees."""

    def __init__(
        self,
        shards: list[str],
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        batches_per_epoch: int,
        collate: Callable[..., Any],
        augment: AugmentConfig,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        start_batch: int = 0,
        num_workers: int = 1,
    ):
        if batches_per_epoch < 1:
            raise ValueError("batches_per_epoch must be >= 1: the split has fewer samples than one global batch")
        if num_workers > batches_per_epoch:
            # Workers take the epoch's batches in turn and the DataLoader reads them round-robin: a worker
            # that owns no batch never yields, and the DataLoader would wait for it forever.
            raise ValueError(
                f"{num_workers} loader workers for {batches_per_epoch} batch(es) per epoch: every worker must own "
                f"at least one batch per epoch; use at most {batches_per_epoch} workers"
            )
        if not resampled and len(shards) < world_size * max(1, num_workers):
            raise NotEnoughShardsError(
                f"{len(shards)} shard(s) for {world_size} rank(s) x {max(1, num_workers)} worker(s): every "
                "worker needs at least one shard. Pack smaller shards (make_shards --shard-size), use fewer "
                "loader workers, or set data.resampled: true."
            )
        self.shards = list(shards)
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.batches_per_epoch = batches_per_epoch
        self.collate = collate
        self.augment = augment
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.resampled = resampled
        self.start_batch = start_batch

    def _worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        if self.resampled:
            rng = random.Random(_seed(self.seed, "resample", epoch, self.rank, worker))
            return [rng.choice(self.shards) for _ in range(len(self.shards))]
        order = list(self.shards)
        random.Random(_seed(self.seed, "shards", epoch)).shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def _raw_stream(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Shuffled raw samples for this (epoch, rank, worker), cycling its shards without end."""
        rng = random.Random(_seed(self.seed, "samples", epoch, self.rank, worker))
        cycle = 0
        while True:
            # Resampled streams draw new shards each pass; plain ones re-read the same shard set.
            shard_epoch = epoch * 1_000_003 + cycle if self.resampled else epoch
            shards = self._worker_shards(shard_epoch, worker, num_workers)
            buffer: list[dict[str, Any]] = []
            produced = 0
            for shard in shards:
                for sample in iterate_tar_samples(shard, self._log_tar_error):
                    produced += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(sample)
                        continue
                    index = rng.randrange(len(buffer))
                    buffer[index], sample = sample, buffer[index]
                    yield sample
            if produced == 0:
                raise RuntimeError(f"rank {self.rank} worker {worker}: shards {shards} hold no readable sample")
            rng.shuffle(buffer)
            yield from buffer  # each pass yields every sample of its shards exactly once
            cycle += 1

    @staticmethod
    def _log_tar_error(shard: str, exc: Exception) -> None:
        logger.warning("skipping unreadable data in shard %s: %s", shard, exc)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            my_batches = [b for b in range(self.batches_per_epoch) if b % num_workers == worker]
            if not my_batches:
                raise RuntimeError(f"loader worker {worker} of {num_workers} owns none of the {self.batches_per_epoch} "
                                   "batches per epoch and would stall the DataLoader; use fewer workers")
            stream = self._raw_stream(epoch, worker, num_workers)
            for batch_index in my_batches:
                if batch_index < offset:
                    for _ in range(self.micro_batch_size):  # skip without decoding (resume)
                        next(stream)
                    continue
                # Seeded per batch, so a resumed stream replays the same augmentations.
                generator = torch.Generator().manual_seed(_seed(self.seed, "augment", epoch, self.rank, batch_index) % 2**63)
                decoded: list[DecodedSample] = []
                skipped = 0
                while len(decoded) < self.micro_batch_size:
                    raw = next(stream)
                    try:
                        decoded.append(decode_sample(raw, self.augment, generator))
                    except Exception as exc:  # noqa: BLE001 - any defect of one sample must not stop the run
                        skipped += 1
                        logger.warning("skipping sample %s from %s: %s", raw.get("__key__"), raw.get("__url__"), exc)
                yield self.collate(decoded, num_skipped=skipped)
            epoch, offset = epoch + 1, 0


_open_iterators: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register  # runs before multiprocessing's own exit hook (registered earlier, run later)
def _shut_down_open_iterators() -> None:
    """Stop the workers of every loader iterator still alive at interpreter exit.

    multiprocessing's exit hook terminates daemon children with SIGTERM and then joins them; our workers
    ignore SIGTERM (``_ignore_stop_signals``), so without this the join would wait forever.
    """
    for iterator in list(_open_iterators):
        shutdown = getattr(iterator, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()  # orderly: each worker finishes its batch and leaves (joined for up to 5 s)
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():  # still busy after that: the terminate() it got is ignored
                worker.kill()


class TrainLoader(DataLoader):
    """The training DataLoader; its iterators are registered for shutdown at interpreter exit."""

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        _open_iterators.add(iterator)
        return iterator


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the trainer, which checkpoints and then shuts them down.

    A scheduler's preemption signal reaches every process of the job; a worker dying on it would make
    the trainer's DataLoader raise before the checkpoint is written.
    """
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(
    shard_dir: str | Path,
    split: str,
    *,
    tokenizer: Any,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    global_batch_size: int,
    image_size: int,
    in_chans: int = 3,
    max_length: int = 256,
    max_sentences: int = 16,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    augment: bool = True,
    seed: int = 0,
    start_batch: int = 0,
) -> tuple[DataLoader, int]:
    """Return an endless per-rank loader and the number of steps in one epoch."""
    split_info = read_dataset_info(shard_dir, split)
    batches_per_epoch = split_info.count // global_batch_size
    if 0 < batches_per_epoch < num_workers:
        logger.warning("%s split %r: %d batch(es) per epoch, so %d loader workers instead of %d (each needs a batch)",
                       shard_dir, split, batches_per_epoch, batches_per_epoch, num_workers)
        num_workers = batches_per_epoch
    stream = ShardStream(
        split_info.shards,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        batches_per_epoch=batches_per_epoch,
        collate=Collator(tokenizer, max_length, max_sentences),
        augment=AugmentConfig(image_size=image_size, in_chans=in_chans, enabled=augment),
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        start_batch=start_batch,
        num_workers=num_workers,
    )
    loader = TrainLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals,
        prefetch_factor=4 if num_workers > 0 else None,
        # Its own generator: creating worker iterators must not draw from the global torch RNG, whose
        # state (patch masking) is checkpointed and restored for exact resume.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, batches_per_epoch
