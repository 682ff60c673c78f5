#!/usr/bin/env python
"""Pack an evaluation benchmark (CheXpert 5x200, RSNA Pneumonia, SIIM-ACR) into WebDataset shards.

    python tools/make_eval_shards.py --benchmark chexpert5x200|rsna|siim --root DIR --out DIR \
        [--size 512] [--seed 0] [--per-class 200] [--shard-size 1000]

Selection and splits follow :mod:`mlip_dist.evaluation.benchmarks` (seeded, split by patient /
ImageId). Output in ``--out``:

* ``<split>-NNNNNN.tar``: samples keyed by :func:`shard_key` of the benchmark id, members
  ``png`` (8-bit grayscale, shorter side ``--size``, area resampling), ``json`` (``id``,
  ``benchmark``, ``split``, ``source``, ``orig_size``, ``size``, ``labels`` {class: 1/0/-1/null};
  CheXpert: ``class``, ``class_name``, ``sex``, ``age``, ``view``; RSNA: ``label``, ``boxes``
  ([x, y, w, h] in stored pixels), ``boxes_orig``; SIIM: ``label``, ``rle_rows``) and, for RSNA
  and SIIM, ``mask.png`` (uint8 0/255, the image's size: boxes filled, or the union of the RLE
  rows resized nearest).
* ``dataset.json`` ``{"splits": {split: {"shards": [...], "num_samples": N}}, "benchmark", "classes",
  ...}``, ``splits.csv`` (``id,split[,class_name]``, the packed samples), ``errors.jsonl`` (skipped
  images with a reason).

Every file is written to ``<name>.tmp`` and renamed; ``dataset.json`` last. Tar members carry a
fixed mtime/owner and samples a fixed order, so the same inputs and seed give identical bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mlip_dist.cli_types import fraction, positive_int, seed
from mlip_dist.data.dicom import ImageReadError, SkipReason, read_dicom
from mlip_dist.data.imaging import ImageFormat, encode, quantize, read_raster, resize_shorter_side
from mlip_dist.evaluation.benchmarks import (
    DEFAULT_FRACTIONS,
    SPLITS,
    Benchmark,
    BenchmarkPlan,
    EvalItem,
    boxes_to_mask,
    plan_benchmark,
    shard_key,
    union_rle_mask,
)

logger = logging.getLogger("make_eval_shards")

SHARD_NAME_RE = re.compile(r"^(?P<split>[A-Za-z0-9_-]+)-\d{6}\.tar$")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardSink:
    """Sequential ``<split>-NNNNNN.tar`` writer: at most ``max_count`` samples per shard, each
    shard written as ``.tmp`` and renamed when complete; deterministic tar headers."""

    def __init__(self, out_dir: Path, split: str, max_count: int) -> None:
        self.out_dir = out_dir
        self.split = split
        self.max_count = max_count
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is not None and self._tmp is not None:
            self._tar.close()
            os.replace(self._tmp, self.out_dir / self.shards[-1])
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None or self._in_shard >= self.max_count:
            self._close_current()
            self._open()
        assert self._tar is not None
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            # Fixed metadata: byte-identical shards for identical inputs.
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = "mlip"
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self._in_shard += 1
        self.count += 1

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()


def _png(array: np.ndarray) -> bytes:
    return encode(array, ImageFormat.PNG)


def read_image(path: Path) -> np.ndarray:
    """[0, 1] float32 (H, W): DICOM through the LUT pipeline of mlip_dist.data.dicom, else a raster."""
    if path.suffix.lower() == ".dcm":
        return read_dicom(path).pixels
    return read_raster(path)


@dataclass(frozen=True)
class PackedSample:
    key: str
    members: dict[str, bytes]
    meta: dict[str, Any]


def pack_item(item: EvalItem, benchmark: Benchmark, size: int) -> PackedSample:
    """Decode, resize and encode one item with its regions; raises ImageReadError to skip it."""
    pixels = read_image(item.image_path)
    orig_h, orig_w = pixels.shape
    stored = quantize(resize_shorter_side(pixels, size), 8)
    height, width = stored.shape
    meta: dict[str, Any] = {
        "id": item.sample_id,
        "benchmark": benchmark.value,
        "split": item.split,
        "source": item.source,
        "orig_size": [orig_h, orig_w],
        "size": [height, width],
        "labels": item.labels,
    }
    members = {"png": _png(stored)}
    if benchmark is Benchmark.CHEXPERT_5X200:
        meta.update({"class": item.class_index, "class_name": item.class_name, **item.extra})
    elif benchmark is Benchmark.RSNA:
        scaled = [box.scaled(width / orig_w, height / orig_h) for box in item.boxes]
        meta.update(
            {
                "label": int(item.labels["Pneumonia"] == 1.0),
                "boxes": [b.as_list() for b in scaled],
                "boxes_orig": [b.as_list() for b in item.boxes],
            }
        )
        members["mask.png"] = _png(boxes_to_mask(scaled, height, width).astype(np.uint8) * 255)
    else:
        try:
            mask = union_rle_mask(item.rles, orig_h, orig_w)
        except ValueError as err:
            raise ImageReadError(
                item.image_path, SkipReason.BAD_REGIONS, f"EncodedPixels for {orig_h}x{orig_w}: {err}"
            ) from err
        if mask.shape != (height, width):
            # Nearest keeps the mask binary; masks are never blended.
            mask = (
                np.asarray(
                    Image.fromarray(mask.astype(np.uint8) * 255).resize(
                        (width, height), Image.Resampling.NEAREST
                    )
                )
                > 0
            )
        meta.update({"label": int(item.labels["Pneumothorax"] == 1.0), "rle_rows": len(item.rles)})
        members["mask.png"] = _png(mask.astype(np.uint8) * 255)
    members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return PackedSample(shard_key(item.sample_id), members, meta)


def _remove_stale_shards(out_dir: Path) -> None:
    """Shards of a previous run would otherwise sit next to the new ones. Its dataset.json goes
    first, so an interrupted run leaves no index that names missing or half-written shards."""
    (out_dir / "dataset.json").unlink(missing_ok=True)
    for path in out_dir.iterdir():
        if SHARD_NAME_RE.match(path.name) or path.name.endswith(".tar.tmp"):
            path.unlink()


def write_benchmark(
    plan: BenchmarkPlan,
    out_dir: str | Path,
    size: int = 512,
    shard_size: int = 1000,
    seed: int = 0,
    progress: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """Pack a plan into shards + dataset.json + splits.csv + errors.jsonl; returns dataset.json's content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out)
    keys: dict[str, str] = {}
    for item in plan.items:
        key = shard_key(item.sample_id)
        if keys.setdefault(key, item.sample_id) != item.sample_id:
            raise ValueError(f"ids {keys[key]!r} and {item.sample_id!r} map to the same shard key {key!r}")
    split_order = [s for s in SPLITS if any(i.split == s for i in plan.items)]
    split_order += sorted({i.split for i in plan.items} - set(split_order))
    errors: list[dict[str, str]] = []
    split_rows: list[list[str]] = []
    splits: dict[str, dict[str, Any]] = {}
    wrap = progress or (lambda it: tqdm(it, desc=f"{plan.benchmark.value}", unit="img"))
    for split in split_order:
        sink = ShardSink(out, split, shard_size)
        try:
            for item in wrap([i for i in plan.items if i.split == split]):
                try:
                    sample = pack_item(item, plan.benchmark, size)
                except ImageReadError as err:
                    errors.append(
                        {
                            "id": item.sample_id,
                            "source": item.source,
                            "reason": err.reason.value,
                            "detail": err.detail,
                        }
                    )
                    logger.warning("skipped %s: %s", item.source, err)
                    continue
                sink.write(sample.key, sample.members)
                row = [item.sample_id, split] + (
                    [item.class_name or ""] if plan.benchmark is Benchmark.CHEXPERT_5X200 else []
                )
                split_rows.append(row)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        splits[split] = {"shards": sink.shards, "num_samples": sink.count}
    for warning in plan.warnings:
        logger.warning("%s", warning)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "split"] + (["class_name"] if plan.benchmark is Benchmark.CHEXPERT_5X200 else []))
    writer.writerows(split_rows)
    write_atomic(out / "splits.csv", buffer.getvalue().encode("utf-8"))
    write_atomic(
        out / "errors.jsonl", "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode("utf-8")
    )
    dataset = {
        "benchmark": plan.benchmark.value,
        "classes": plan.classes,
        "splits": splits,
        "size": size,
        "seed": seed,
        "image_format": "png",
        "bit_depth": 8,
        "mask": plan.benchmark is not Benchmark.CHEXPERT_5X200,
        "skipped": len(errors),
        "warnings": plan.warnings,
        "info": plan.info,
    }
    write_atomic(out / "dataset.json", (json.dumps(dataset, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=[b.value for b in Benchmark])
    parser.add_argument("--root", required=True, type=Path, help="benchmark folder in its public layout")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=positive_int, default=512, help="shorter side of the stored images")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the 5x200 draw / the splits")
    parser.add_argument("--per-class", type=positive_int, default=200, help="CheXpert 5x200: images per class")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument(
        "--fractions",
        type=fraction,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VALIDATE", "TEST"),
        help="RSNA/SIIM split fractions (by patient / ImageId), each in [0, 1], summing to 1",
    )
    args = parser.parse_args(argv)
    if not math.isclose(sum(args.fractions), 1.0, abs_tol=1e-6):
        parser.error(f"argument --fractions: {' '.join(map(str, args.fractions))} must sum to 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = plan_benchmark(
        Benchmark(args.benchmark),
        args.root,
        seed=args.seed,
        per_class=args.per_class,
        fractions=args.fractions,
    )
    dataset = write_benchmark(plan, args.out, size=args.size, shard_size=args.shard_size, seed=args.seed)
    counts = ", ".join(f"{s}: {v['num_samples']}" for s, v in dataset["splits"].items())
    logger.info(
        "wrote %s to %s (%s; %d skipped, see errors.jsonl)",
        args.benchmark,
        args.out,
        counts,
        dataset["skipped"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
