"""Training loader over the WebDataset shards of ``tools/make_shards.py``: one global, elastic sample order.

Guarantees:
- One global sample order per epoch, a function of (seed, epoch, shard list, per-shard sample counts,
  ``shuffle_buffer``) only: the shards are shuffled (seeded by seed and epoch), their samples concatenated,
  and consecutive windows of ``shuffle_buffer`` samples are shuffled (window ``w`` seeded by seed, epoch and
  ``w``; 0 or 1 = no shuffling within windows), so one batch reads from a few shards only. With
  ``resampled`` each epoch draws its shard list with replacement (seeded by seed and epoch), as many shards as
  the split has, and more while the drawn samples do not fill the epoch. Counts come from ``dataset.json``
  (``shard_samples``); an older ``dataset.json`` without them is counted once from the tar headers.
- Step ``s`` (absolute, counted from the start of training) is the global batch of positions
  ``[b*G, (b+1)*G)`` of epoch ``e``'s order, with ``e, b = divmod(s, batches_per_epoch)``, ``G`` the global
  batch size and ``batches_per_epoch = count // G`` (the tail of an epoch's order is unused that epoch).
  Rank ``r`` gets positions ``[b*G + r*m, b*G + (r+1)*m)`` (``m`` the micro batch), so every rank yields the
  same number of micro-batches and ranks step in lockstep, and the union of the ranks' micro-batches of a
  step is the same samples in the same order whatever the world size or number of loader workers (elastic
  determinism, as in MosaicML StreamingDataset). Any rank may read any shard: fewer shards than ranks x
  workers is fine.
- Exact resume: a run started at ``start_batch = s`` yields exactly the micro-batches of steps ``s, s+1, ...``
  of an uninterrupted run, on the same or another layout (world size, workers) with the same global batch;
  nothing before ``s`` is read. Loader worker ``w`` of ``W`` builds steps ``start_batch + w + i*W``, and the
  DataLoader's round robin over workers delivers them in step order; every worker always has a next step,
  so no worker count can stall the DataLoader.
- Augmentation and the patch mask of a sample (``MLIPBatch.mask_seeds``) are seeded by (seed, epoch, its
  position in the order), never by rank, worker or
  place in a micro-batch: a sample looks the same on every layout and after a resume.
- Faults never stop the run and never shift the order. A sample that cannot be decoded (undecodable image,
  bad JSON, no sentences) is counted in ``MLIPBatch.num_skipped`` and logged with its key and shard; a
  position that does not exist because its shard is cut (truncated) or unreadable is counted in
  ``MLIPBatch.num_lost``, its shard listed in ``MLIPBatch.shard_errors`` and logged. Either is replaced by a
  substitute: attempt ``k`` for place ``j`` of step ``s``'s global batch takes the position drawn by a hash of
  (seed, epoch, s, j, k) over the epoch's order, until one decodes (at most ``MAX_SUBSTITUTE_ATTEMPTS``, then
  a ``RuntimeError`` naming the failing shards). Substitutes depend on global quantities only, so resumed and
  re-laid-out runs build the same batches. A shard that changes on disk during training is re-indexed.
- Samples are read by random access: each worker indexes a shard lazily on first use (tar headers only, the
  webdataset key convention: a member's basename up to its first dot is the sample key, consecutive members
  with one key form a sample) and keeps a few indexes and open files (LRU). The raw sample handed to
  ``decode_sample`` is webdataset's: ``__key__``, ``__url__`` (the shard path) and one bytes entry per member
  extension (``png``/``jpg``, ``json``, ...). Members are only read into memory; nothing is ever extracted.
- Workers ignore SIGTERM/SIGINT (the trainer checkpoints first, then stops them), so the loader's
  iterators are shut down by an exit hook: a process that ends without closing one (an exception, a
  global iterator) exits instead of waiting forever in multiprocessing's join of the workers.
"""

from __future__ import annotations

import atexit
import bisect
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mlip_dist.data import remote
from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD, PIXEL_MAX, MLIPBatch

logger = logging.getLogger(__name__)
MAX_SUBSTITUTE_ATTEMPTS = 64  # draws for one place of a batch before the loader gives up


class NotEnoughShardsError(ValueError):
    """Kept for compatibility: the loader no longer needs a shard per rank and worker, so it never raises it."""


@dataclass(frozen=True)
class SplitInfo:
    shards: list[str]  # absolute paths, or URLs / pipe commands of a remote base (mlip_dist.data.remote)
    count: int
    # Samples of each shard, parallel to ``shards``; None when dataset.json predates them (see
    # ``count_shard_samples``, which the training loader calls then).
    shard_samples: list[int] | None = None
    dataset_json: str = ""  # sha256 of the dataset.json read: names the shard cache of a remote base


def read_dataset_info(shard_dir: str | Path, split: str, *, timeout_s: float | None = None,
                      retries: int | None = None) -> SplitInfo:
    """Read ``<shard_dir>/dataset.json`` and return the shard paths and sample counts of ``split``.

    ``shard_dir`` may be remote (a URL or ``pipe:`` template, :mod:`mlip_dist.data.remote`): dataset.json is
    then fetched (``timeout_s``/``retries``, default :func:`remote.configure`; a ``FetchError`` names its URL
    and the reason) and the shards are URLs, fetched into a cache when read.
    """
    if remote.is_remote(shard_dir):
        info_path: Any = remote.join(shard_dir, "dataset.json")
        text = remote.read_text(info_path, timeout_s=timeout_s, retries=retries)
    else:
        shard_dir = Path(shard_dir)
        info_path = shard_dir / "dataset.json"
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} not found: pack shards first with tools/make_shards.py")
        text = info_path.read_text()
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{info_path}: not JSON ({exc})") from exc
    splits = info.get("splits", info)
    if split not in splits:
        raise KeyError(f"{info_path}: no split {split!r}; available: {', '.join(sorted(splits))}")
    entry = splits[split]
    shards = [remote.join(shard_dir, name) for name in entry["shards"]]
    missing = [] if remote.is_remote(shard_dir) else [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{info_path}: {len(missing)} shard(s) listed but missing, e.g. {missing[0]}")
    shard_samples = entry.get("shard_samples")
    if shard_samples is not None:
        shard_samples = [int(n) for n in shard_samples]
        if len(shard_samples) != len(shards) or min(shard_samples, default=0) < 0:
            raise ValueError(f"{info_path}: split {split!r} lists {len(shards)} shards but shard_samples "
                             f"{shard_samples[:8]}{'...' if len(shard_samples) > 8 else ''} "
                             f"({len(shard_samples)} entries): re-pack with tools/make_shards.py")
        if sum(shard_samples) != int(entry["num_samples"]):
            logger.warning("%s: split %r: shard_samples sum to %d, num_samples is %d", info_path, split,
                           sum(shard_samples), int(entry["num_samples"]))
    return SplitInfo(shards=shards, count=int(entry["num_samples"]), shard_samples=shard_samples,
                     dataset_json=hashlib.sha256(text.encode()).hexdigest())


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class AugmentConfig:
    """Mild augmentation of METHOD.md (Data): random resized crop 0.8-1.0, small rotation, brightness/contrast.

    ``compact``: samples leave the decoder as pixels of the stored bit depth, one channel (uint8 or uint16,
    rounded after augmentation), to be normalised on the device (:meth:`MLIPBatch.to`); otherwise as normalised
    float with ``in_chans`` channels.
    """

    image_size: int = 224
    in_chans: int = 3
    enabled: bool = True
    crop_scale: tuple[float, float] = (0.8, 1.0)
    max_rotation_deg: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1
    compact: bool = False


def decode_pixels(data: bytes) -> tuple[torch.Tensor, int]:
    """PNG (8/16-bit) or JPEG bytes -> (float tensor (1, H, W) in [0, 1], stored bit depth 8 or 16)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I"):
            array, bit_depth = np.asarray(img, dtype=np.float32) / 65535.0, 16
        else:
            array, bit_depth = np.asarray(img.convert("L"), dtype=np.float32) / 255.0, 8
    return torch.from_numpy(np.ascontiguousarray(array))[None], bit_depth


def decode_image(data: bytes) -> torch.Tensor:
    """PNG (8/16-bit) or JPEG bytes -> float tensor (1, H, W) in [0, 1]."""
    return decode_pixels(data)[0]


def augment_image(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Resize (1, H, W) in [0, 1] to ``image_size`` x ``image_size``, augmented when a generator is given; [0, 1].

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
    return image.clamp(0, 1)


def quantize_pixels(image: torch.Tensor, bit_depth: int) -> torch.Tensor:
    """[0, 1] float -> uint8 (bit depth 8) or uint16 (16), rounded to the nearest level."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit depth must be 8 or 16, got {bit_depth}")
    dtype = torch.uint8 if bit_depth == 8 else torch.uint16
    return torch.round(image * PIXEL_MAX[dtype]).to(dtype)


def preprocess_image(image: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`augment_image`, then normalised and repeated to ``in_chans`` channels (float)."""
    image = (augment_image(image, config, generator) - IMAGE_MEAN) / IMAGE_STD
    return image.expand(config.in_chans, -1, -1).contiguous()


@dataclass
class DecodedSample:
    key: str
    image: torch.Tensor
    sentences: list[str]
    meta: dict[str, Any]
    mask_seed: int | None = None  # seeds this sample's patch mask (training: from its place in the global order)


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
    pixels, bit_depth = decode_pixels(image_bytes)
    image = (quantize_pixels(augment_image(pixels, augment, generator), bit_depth) if augment.compact
             else preprocess_image(pixels, augment, generator))
    return DecodedSample(key=key, image=image, sentences=sentences, meta=meta)


class Collator:
    """Tokenise each report once with sentence spans (METHOD.md, Encoders: Text) and stack images.

    Compact pixels of mixed bit depths are stacked as uint16 (8-bit values scaled by 257, so 255 -> 65535);
    ``channels`` is the model's input channels, recorded on the batch for :meth:`MLIPBatch.to`.
    """

    def __init__(self, tokenizer: Any, max_length: int, max_sentences: int, channels: int = 3):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_sentences = max_sentences
        self.channels = channels

    @staticmethod
    def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
        if any(image.dtype == torch.uint16 for image in images):
            images = [image.to(torch.uint16) * 257 if image.dtype == torch.uint8 else image for image in images]
        return torch.stack(images)

    def __call__(self, samples: list[DecodedSample], num_skipped: int = 0, num_lost: int = 0,
                 shard_errors: list[str] | None = None) -> MLIPBatch:
        from mlip_dist.text.tokenize import tokenize_with_spans

        input_ids, attention_mask, spans, sentence_mask = tokenize_with_spans(
            self.tokenizer, [s.sentences for s in samples], self.max_length, self.max_sentences
        )
        return MLIPBatch(
            images=self.stack_images([s.image for s in samples]),
            input_ids=input_ids,
            attention_mask=attention_mask,
            sentence_spans=spans,
            sentence_mask=sentence_mask,
            keys=[s.key for s in samples],
            mask_seeds=(torch.tensor([s.mask_seed for s in samples], dtype=torch.int64)
                        if samples and all(s.mask_seed is not None for s in samples) else None),
            num_skipped=num_skipped,
            num_lost=num_lost,
            shard_errors=list(shard_errors or []),
            channels=self.channels,
        )


def iterate_tar_samples(shard: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (bytes per member); a broken shard stops after its last good sample."""
    import webdataset as wds

    def handler(exc: Exception) -> bool:
        on_error(shard, exc)
        return True

    source = [{"url": shard}]
    yield from wds.tariterators.tarfile_samples(source, handler=handler)


# --------------------------------------------------------------------------- random access to shards

_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def _key_and_extension(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name into sample key and (lower-cased) extension; None to skip it."""
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return None
    if _SKIP_META.match(name):
        return None
    match = _KEY_AND_EXT.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


@dataclass
class ShardIndex:
    """Where each sample of one tar shard lies: its key and its members' byte ranges.

    ``spans[i] = (offset, length)`` covers all members of sample ``i`` (they are consecutive in the tar);
    ``members[i]`` holds ``(extension, offset within the span, size)`` of each member.
    """

    path: str
    signature: tuple[int, ...]  # (device, inode, size, mtime_ns) when indexed: a change means re-index
    keys: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    members: list[tuple[tuple[str, int, int], ...]] = field(default_factory=list)
    problem: str | None = None  # why the shard ends early (cut, unreadable header), None for a whole shard

    def __len__(self) -> int:
        return len(self.keys)


def _signature(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def index_shard(path: str, expected: int | None = None) -> ShardIndex:
    """Index a tar shard from its headers alone (no member data is read).

    Members are grouped into samples as webdataset does (consecutive members with one key). A shard that is
    cut (truncated, or a broken header in the middle: no end-of-archive marker) keeps the samples before the
    cut and says why in ``problem``; the sample at the cut is dropped when one of its members runs past the end
    of the file or when it lacks members the shard's first sample has. ``expected`` (the count from
    dataset.json), when given, makes a shard with fewer samples count as damaged too. Raises ``OSError`` when
    the file cannot be read.
    """
    stat = os.stat(path)
    index = ShardIndex(path=path, signature=_signature(stat))
    groups: list[tuple[str, list[tuple[str, int, int]]]] = []
    past_end = False
    problem: str | None = None
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            while True:
                member = archive.next()
                if member is None:
                    handle.seek(archive.offset)
                    block = handle.read(tarfile.BLOCKSIZE)
                    if block != bytes(tarfile.BLOCKSIZE):  # no end-of-archive marker: a cut or a bad header
                        problem = f"no tar header or end-of-archive marker at byte {archive.offset}"
                    break
                archive.members = []  # headers only; keep memory flat
                if not member.isreg():
                    continue
                key_ext = _key_and_extension(member.name)
                if key_ext is None:
                    continue
                key, ext = key_ext
                if not groups or groups[-1][0] != key:
                    groups.append((key, []))
                if member.offset_data + member.size > stat.st_size:
                    past_end = True
                    problem = f"member {member.name} runs past the end of the file ({stat.st_size} bytes)"
                    break
                if any(e == ext for e, _, _ in groups[-1][1]):
                    logger.warning("shard %s: duplicate member %s ignored (webdataset drops it too)", path, member.name)
                    continue
                groups[-1][1].append((ext, member.offset_data, member.size))
    except (tarfile.TarError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None and groups:
        first = {ext for ext, _, _ in groups[0][1]}
        last = {ext for ext, _, _ in groups[-1][1]}
        if past_end or (len(groups) > 1 and last < first):
            groups.pop()  # the sample the cut went through
    groups = [g for g in groups if g[1]]
    for key, members in groups:
        start = members[0][1]
        end = members[-1][1] + members[-1][2]
        index.keys.append(key)
        index.spans.append((start, end - start))
        index.members.append(tuple((ext, offset - start, size) for ext, offset, size in members))
    if problem is None and expected is not None and len(groups) < expected:
        problem = f"ends after {len(groups)} samples"
    index.problem = problem
    return index


def count_shard_samples(shards: list[str], cache: remote.ShardCache | None = None) -> list[int]:
    """Samples of each shard, counted from the tar headers (for a dataset.json without ``shard_samples``);
    remote shards are fetched into ``cache`` for that."""
    start = time.perf_counter()
    counts = []
    for shard in shards:
        try:
            index = index_shard(str(cache.local_path(shard)) if cache is not None else shard)
            if cache is not None:
                cache.release()
        except OSError as exc:
            logger.warning("cannot count the samples of shard %s (%s): counted as 0", shard, exc)
            counts.append(0)
            continue
        if index.problem is not None:
            logger.warning("shard %s is damaged (%s): counted %d samples", shard, index.problem, len(index))
        counts.append(len(index))
    logger.info("dataset.json has no shard_samples: counted %d samples in %d shard(s) from their tar headers "
                "in %.1f s (re-pack with tools/make_shards.py to skip this)", sum(counts), len(shards),
                time.perf_counter() - start)
    return counts


class ShardReader:
    """Random access to the samples of tar shards, for one process (a loader worker).

    Keeps the indexes of the last ``max_indexes`` shards it read and ``max_open_files`` open files (LRU).
    A shard is checked (``stat``) once per batch (``begin_batch``); when it changed on disk it is re-indexed.
    With a ``cache`` the shards are URLs (remote base): each is fetched whole into the cache when first used
    in a batch (pinned there until the next ``begin_batch``) and read from the local copy; a shard that
    cannot be fetched (after the cache's retries) is unreadable, and not fetched again in the same epoch.
    """

    def __init__(self, expected: dict[str, int] | None = None, max_open_files: int = 8, max_indexes: int = 32,
                 cache: remote.ShardCache | None = None):
        self.expected = expected or {}
        self.cache = cache
        self._epoch: int | None = None
        self._fetch_failed: dict[str, int | None] = {}  # shard -> epoch its fetch failed in
        self.max_open_files = max(1, max_open_files)
        self.max_indexes = max(1, max_indexes)
        self._indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self._files: OrderedDict[str, int] = OrderedDict()
        self._checked: dict[str, str | None] = {}  # this batch: shard -> None (fine) or why unreadable
        self._reported: set[tuple[str, str]] = set()

    def begin_batch(self, epoch: int | None = None) -> None:
        self._checked.clear()
        self._epoch = epoch
        if self.cache is not None:
            self.cache.release()

    def _local(self, shard: str) -> str:
        """The file to read for ``shard``: itself, or its local copy in the cache (fetched when absent)."""
        if self.cache is None:
            return shard
        if shard in self._fetch_failed and self._fetch_failed[shard] == self._epoch:
            raise OSError(f"fetch failed earlier in epoch {self._epoch}; tried again next epoch")
        try:
            return str(self.cache.local_path(shard))
        except remote.FetchError:
            self._fetch_failed[shard] = self._epoch
            raise

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._indexes.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _warn_once(self, shard: str, message: str) -> None:
        if (shard, message) not in self._reported:
            self._reported.add((shard, message))
            logger.warning("shard %s: %s", shard, message)

    def _drop(self, shard: str) -> None:
        self._indexes.pop(shard, None)
        fd = self._files.pop(shard, None)
        if fd is not None:
            os.close(fd)

    def _index(self, shard: str) -> ShardIndex | None:
        """The index of ``shard``, checked against the file once per batch; None when it cannot be read."""
        index = self._indexes.get(shard)
        if shard in self._checked:  # checked earlier in this batch
            if self._checked[shard] is not None:
                return None
            if index is not None:
                self._indexes.move_to_end(shard)
                return index
        try:
            local = self._local(shard)
            signature = _signature(os.stat(local))
            if index is None or index.signature != signature or index.path != local:
                if index is not None:
                    (logger.info if self.cache is not None else logger.warning)(
                        "shard %s changed on disk%s: re-indexing it", shard,
                        " (fetched into the cache again)" if self.cache is not None else "")
                self._drop(shard)
                expected = self.expected.get(shard)
                index = index_shard(local, expected)
                self._indexes[shard] = index
                while len(self._indexes) > self.max_indexes:
                    self._drop(next(iter(self._indexes)))
                if index.problem is not None:
                    where = f"{len(index)} of {expected}" if expected is not None else f"{len(index)}"
                    self._warn_once(shard, f"cut or damaged ({index.problem}): {where} samples readable, the "
                                           "missing positions are counted as lost and replaced by substitutes")
                elif expected is not None and len(index) > expected:
                    self._warn_once(shard, f"holds {len(index)} samples, dataset.json says {expected}: the last "
                                           f"{len(index) - expected} are never used (re-pack or fix dataset.json)")
            self._indexes.move_to_end(shard)
        except OSError as exc:
            self._drop(shard)
            self._checked[shard] = f"unreadable ({exc})"
            self._warn_once(shard, f"unreadable ({exc}): its positions are counted as lost and replaced by substitutes")
            return None
        self._checked[shard] = None
        return index

    def _fd(self, shard: str) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = os.open(self._indexes[shard].path, os.O_RDONLY)  # the shard, or its copy in the cache
            self._files[shard] = fd
            while len(self._files) > self.max_open_files:
                os.close(self._files.popitem(last=False)[1])
        self._files.move_to_end(shard)
        return fd

    def read(self, shard: str, sample: int) -> dict[str, Any] | None:
        """The raw webdataset sample ``sample`` of ``shard``, or None when it does not exist or cannot be read."""
        index = self._index(shard)
        if index is None or sample >= len(index):
            return None
        offset, length = index.spans[sample]
        try:
            data = os.pread(self._fd(shard), length, offset)
        except OSError as exc:
            self._drop(shard)
            self._checked[shard] = f"unreadable ({exc})"
            self._warn_once(shard, self._checked[shard])
            return None
        if len(data) != length:  # cut after it was indexed; the next batch re-indexes it
            self._warn_once(shard, f"sample {index.keys[sample]} cut short ({len(data)} of {length} bytes)")
            return None
        raw: dict[str, Any] = {"__key__": index.keys[sample], "__url__": shard}
        for ext, start, size in index.members[sample]:
            raw[ext] = data[start : start + size]
        return raw


# --------------------------------------------------------------------------- the global order


class EpochOrder:
    """The global sample order of one epoch: position ``t`` -> (shard index, sample index within the shard).

    A function of (seed, epoch, counts, shuffle_buffer, resampled, min_length) only; see the module docstring.
    Window permutations are computed on demand, so only the windows a batch touches are ever built.
    """

    def __init__(self, counts: list[int], *, seed: int, epoch: int, shuffle_buffer: int, resampled: bool,
                 min_length: int):
        num_shards = len(counts)
        if sum(counts) == 0:
            raise ValueError("the shards hold no sample")
        if resampled:
            rng = random.Random(_seed(seed, "resample", epoch))
            slots = [rng.randrange(num_shards) for _ in range(num_shards)]
            total = sum(counts[i] for i in slots)
            while total < min_length:  # small shards drawn: draw more until the epoch's batches are filled
                slots.append(rng.randrange(num_shards))
                total += counts[slots[-1]]
        else:
            slots = list(range(num_shards))
            random.Random(_seed(seed, "shards", epoch)).shuffle(slots)
            total = sum(counts)
        if total < min_length:
            raise ValueError(f"the shards hold {total} samples, fewer than the {min_length} one epoch needs")
        self.seed, self.epoch = seed, epoch
        self.slots = slots  # shard index of each slot of the concatenation
        self.starts = []  # first concatenated position of each slot
        position = 0
        for shard in slots:
            self.starts.append(position)
            position += counts[shard]
        self.length = total
        self.window = max(1, shuffle_buffer)
        self._permutations: OrderedDict[int, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def _permutation(self, window: int) -> list[int]:
        permutation = self._permutations.get(window)
        if permutation is None:
            size = min(self.window, self.length - window * self.window)
            permutation = list(range(size))
            random.Random(_seed(self.seed, "window", self.epoch, window)).shuffle(permutation)
            self._permutations[window] = permutation
            while len(self._permutations) > 8:
                self._permutations.popitem(last=False)
        self._permutations.move_to_end(window)
        return permutation

    def locate(self, position: int) -> tuple[int, int]:
        if not 0 <= position < self.length:
            raise IndexError(f"position {position} outside the epoch's {self.length} samples")
        if self.window > 1:
            window, offset = divmod(position, self.window)
            position = window * self.window + self._permutation(window)[offset]
        slot = bisect.bisect_right(self.starts, position) - 1
        return self.slots[slot], position - self.starts[slot]


class ShardStream(IterableDataset):
    """Per-rank stream of collated micro-batches, one per absolute step; see the module docstring.

    ``shard_samples`` (the samples of each shard) default to a count from the tar headers. ``num_workers`` is
    accepted for compatibility; the worker split comes from the DataLoader (``get_worker_info``).
    """

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
        shard_samples: list[int] | None = None,
        max_open_files: int = 8,
        max_indexes: int = 32,
        cache: remote.ShardCache | None = None,
    ):
        if batches_per_epoch < 1:
            raise ValueError("batches_per_epoch must be >= 1: the split has fewer samples than one global batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if start_batch < 0:
            raise ValueError("start_batch must be >= 0")
        if not shards:
            raise ValueError("no shards")
        self.shards = list(shards)
        self.cache = cache  # remote shards (URLs): fetched whole into this cache, then read locally
        counts = list(shard_samples) if shard_samples is not None else count_shard_samples(self.shards, cache)
        if len(counts) != len(self.shards):
            raise ValueError(f"{len(counts)} sample counts for {len(self.shards)} shards")
        if sum(counts) == 0:
            raise ValueError(f"shards {self.shards[:3]}... hold no sample")
        self.shard_samples = counts
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = micro_batch_size * world_size
        self.batches_per_epoch = batches_per_epoch
        if not resampled and sum(counts) < batches_per_epoch * self.global_batch_size:
            raise ValueError(f"{batches_per_epoch} batches of {self.global_batch_size} per epoch need "
                             f"{batches_per_epoch * self.global_batch_size} samples; the shards hold {sum(counts)}")
        self.collate = collate
        self.augment = augment
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.resampled = resampled
        self.start_batch = start_batch
        self.max_open_files, self.max_indexes = max_open_files, max_indexes
        self._reader: ShardReader | None = None
        self._orders: OrderedDict[int, EpochOrder] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # workers build their own reader and orders
        state = dict(self.__dict__)
        state["_reader"], state["_orders"] = None, OrderedDict()
        return state

    def epoch_order(self, epoch: int) -> EpochOrder:
        order = self._orders.get(epoch)
        if order is None:
            order = EpochOrder(self.shard_samples, seed=self.seed, epoch=epoch, shuffle_buffer=self.shuffle_buffer,
                               resampled=self.resampled, min_length=self.batches_per_epoch * self.global_batch_size)
            self._orders[epoch] = order
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return order

    def _substitute(self, epoch: int, step: int, place: int, attempt: int, length: int) -> int:
        return _seed(self.seed, "substitute", epoch, step, place, attempt) % length

    def batch(self, step: int) -> Any:
        """This rank's micro-batch of absolute step ``step``."""
        if self._reader is None:
            self._reader = ShardReader({s: n for s, n in zip(self.shards, self.shard_samples, strict=True)},
                                       self.max_open_files, self.max_indexes, cache=self.cache)
        reader = self._reader
        epoch, batch_index = divmod(step, self.batches_per_epoch)
        reader.begin_batch(epoch)
        order = self.epoch_order(epoch)
        first = batch_index * self.global_batch_size
        decoded: list[DecodedSample] = []
        skipped = lost = 0
        failed: list[str] = []
        for place in range(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size):
            position = first + place
            for attempt in range(MAX_SUBSTITUTE_ATTEMPTS + 1):
                if attempt:
                    position = self._substitute(epoch, step, place, attempt, len(order))
                shard_index, sample_index = order.locate(position)
                shard = self.shards[shard_index]
                raw = reader.read(shard, sample_index)
                if raw is None:
                    lost += 1
                    if shard not in failed:
                        failed.append(shard)
                    continue
                # Seeded by the sample's place in the global order: the same on every layout and resume.
                generator = torch.Generator().manual_seed(_seed(self.seed, "augment", epoch, position) % 2**63)
                try:
                    sample = decode_sample(raw, self.augment, generator)
                    sample.mask_seed = _seed(self.seed, "mask", epoch, position) % 2**63
                    decoded.append(sample)
                    break
                except Exception as exc:  # noqa: BLE001 - any defect of one sample must not stop the run
                    skipped += 1
                    logger.warning("skipping sample %s from %s: %s", raw.get("__key__"), shard, exc)
            else:
                raise RuntimeError(
                    f"step {step}, place {place} of the global batch: {MAX_SUBSTITUTE_ATTEMPTS + 1} positions in a "
                    f"row could not be read or decoded (failing shards: {', '.join(failed) or 'none'}; the rest "
                    "were corrupt samples, see the log): the data set is mostly broken"
                )
        return self.collate(decoded, num_skipped=skipped, num_lost=lost, shard_errors=failed)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_batch + worker
        while True:
            yield self.batch(step)
            step += num_workers


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
    max_open_files: int = 8,
    cache_dir: str | None = None,
    cache_max_bytes: int | None = None,
    fetch_timeout_s: float | None = None,
    fetch_retries: int | None = None,
    pin_memory: bool = False,
    compact: bool = True,
) -> tuple[DataLoader, int]:
    """Return an endless per-rank loader, starting at absolute step ``start_batch``, and the steps in one epoch.

    ``shard_dir`` may be a URL or ``pipe:`` template (:mod:`mlip_dist.data.remote`): its shards are fetched
    whole into a cache (``cache_dir``, ``cache_max_bytes``, ``fetch_timeout_s``, ``fetch_retries``: DataConfig's
    fields; None: :func:`remote.configure`'s defaults) and read from there. The order is the same either way.
    Batches hold compact pixels (:class:`MLIPBatch`; ``in_chans`` is the model's channels, made on the device;
    ``compact=False``: normalised float with ``in_chans`` channels, as before, for comparison);
    ``pin_memory`` (for a CUDA device) puts them in page-locked memory for an asynchronous copy.
    """
    if micro_batch_size * world_size != global_batch_size:
        raise ValueError(f"micro batch {micro_batch_size} x world size {world_size} != global batch "
                         f"{global_batch_size}: the loader splits each global batch over the ranks")
    split_info = read_dataset_info(shard_dir, split, timeout_s=fetch_timeout_s, retries=fetch_retries)
    cache = remote.cache_for(shard_dir, dataset_json=split_info.dataset_json, cache_dir=cache_dir,
                             max_bytes=cache_max_bytes, timeout_s=fetch_timeout_s, retries=fetch_retries)
    batches_per_epoch = split_info.count // global_batch_size
    shard_samples = split_info.shard_samples
    if shard_samples is None:
        shard_samples = count_shard_samples(split_info.shards, cache)
    stream = ShardStream(
        split_info.shards,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        batches_per_epoch=batches_per_epoch,
        collate=Collator(tokenizer, max_length, max_sentences, channels=in_chans),
        augment=AugmentConfig(image_size=image_size, in_chans=in_chans, enabled=augment, compact=compact),
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        start_batch=start_batch,
        num_workers=num_workers,
        shard_samples=shard_samples,
        max_open_files=max_open_files,
        cache=cache,
    )
    loader = TrainLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=pin_memory,
        # Its own generator: creating worker iterators must not draw from the global torch RNG, whose
        # state (patch masking) is checkpointed and restored for exact resume.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, batches_per_epoch
