#!/usr/bin/env python
"""MIMIC-CXR (DICOM or JPG release) to WebDataset shards, or verify a shard folder.

    python tools/make_shards.py --root <MIMIC root> --out <dir> [--workers N] [--size 512]
        [--views PA,AP] [--image-format png|jpg] [--shard-size 1000] [--limit N] ...
    python tools/make_shards.py --verify <dir>

Exit status: 0 on success; 1 when nothing was packed, the skipped fraction exceeds
--max-error-frac, or --verify finds a problem; 2 on bad arguments or unusable inputs.
The work is done by mlip_dist.data.shard_writer (see its docstring for the guarantees).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlip_dist.cli_types import enum_option, fraction, int_range, positive_int
from mlip_dist.data.imaging import ImageFormat, Resample
from mlip_dist.data.mimic import ImagesPerStudy, Labeler, MetadataError
from mlip_dist.data.shard_writer import TAR_RECORD, PackOptions, StartMethod, pack
from mlip_dist.data.verify import verify_shards


def _csv_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verify", type=Path, help="check a shard folder against its manifest and exit")
    p.add_argument("--root", type=Path, help="image root (holds files/pNN/...)")
    p.add_argument("--out", type=Path, help="output folder for shards, manifest, dataset.json, errors.jsonl")
    p.add_argument(
        "--reports-root", type=Path, help="root of the reports files/pNN/.../sNNN.txt (default --root)"
    )
    p.add_argument(
        "--csv-root", type=Path, help="folder with the CSVs (default: search --root, then --reports-root)"
    )
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument("--size", type=positive_int, default=512, help="shorter side of the stored image")
    p.add_argument(
        "--views", type=_csv_list, default=("PA", "AP"), help="ViewPositions kept, in preference order"
    )
    p.add_argument("--image-format", **enum_option(ImageFormat), default=ImageFormat.PNG)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--resample", **enum_option(Resample), default=Resample.AREA)
    p.add_argument(
        "--images-per-study", **enum_option(ImagesPerStudy), default=ImagesPerStudy.ONE
    )
    p.add_argument("--labeler", **enum_option(Labeler), default=Labeler.CHEXPERT)
    p.add_argument("--shard-size", type=positive_int, default=1000, help="max samples per shard")
    p.add_argument(
        "--max-shard-bytes", type=int_range(ge=TAR_RECORD), default=2**30,
        help="max bytes per shard (tar overhead included)",
    )
    p.add_argument("--splits", type=_csv_list, default=None, help="only these splits (default: all)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N selected images (plan order)")
    p.add_argument("--max-sentences", type=positive_int, default=16)
    p.add_argument("--max-error-frac", type=fraction, default=0.05, help="in [0, 1]")
    p.add_argument("--start-method", **enum_option(StartMethod), default=StartMethod.SPAWN)
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other inputs/options")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.verify is None and (args.root is None or args.out is None):
        p.error("--root and --out are required (or --verify DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        report = verify_shards(args.verify, progress=not args.no_progress)
        for problem in report.problems:
            print(f"PROBLEM {problem}", file=sys.stderr)
        status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
        print(f"verify {args.verify}: {report.shards} shards, {report.samples} samples: {status}")
        return 0 if report.ok else 1
    options = PackOptions(
        root=args.root,
        out=args.out,
        reports_root=args.reports_root,
        csv_root=args.csv_root,
        workers=args.workers,
        size=args.size,
        views=args.views,
        image_format=args.image_format,
        bit_depth=args.bit_depth,
        resample=args.resample,
        shard_size=args.shard_size,
        max_shard_bytes=args.max_shard_bytes,
        images_per_study=args.images_per_study,
        labeler=args.labeler,
        splits=args.splits,
        limit=args.limit,
        max_sentences=args.max_sentences,
        max_error_frac=args.max_error_frac,
        start_method=args.start_method,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        summary = pack(options)
    except (ValueError, MetadataError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    if summary.packed == 0:
        print("make_shards: nothing was packed; see errors.jsonl", file=sys.stderr)
        return 1
    if summary.error_fraction > options.max_error_frac:
        print(
            f"make_shards: {summary.error_fraction:.1%} of inputs were skipped (> --max-error-frac "
            f"{options.max_error_frac:.1%}); see {options.out / 'errors.jsonl'}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
