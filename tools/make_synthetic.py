#!/usr/bin/env python
"""Write a synthetic MIMIC-CXR-like dataset (docs/SYNTHETIC.md).

    python tools/make_synthetic.py --out data/synthetic --studies 200 --seed 0 --format dicom
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlip_dist.cli_types import int_range, open_fraction, positive_int, seed  # noqa: E402
from mlip_dist.data.synthetic.generator import ImageFormat, SyntheticConfig, generate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> SyntheticConfig:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (the dataset root)")
    parser.add_argument("--studies", type=positive_int, required=True, help="number of MIMIC-CXR studies")
    parser.add_argument("--seed", type=seed, default=defaults.seed, help="same seed -> byte-identical files")
    parser.add_argument("--format", choices=[f.value for f in ImageFormat], default=defaults.format.value,
                        help="dicom = MIMIC-CXR 2.0.0 (12-bit DICOM); jpg = MIMIC-CXR-JPG (8-bit JPEG)")
    parser.add_argument("--image-size", type=int_range(ge=64), default=defaults.image_size,
                        help="long side of MIMIC images in pixels (each image varies up to 10%% below)")
    parser.add_argument("--images-per-study", type=positive_int, default=defaults.images_per_study,
                        help="at most this many images per study: frontal [+ lateral] [+ second frontal]")
    parser.add_argument("--eval-sets", action=argparse.BooleanOptionalAction, default=defaults.eval_sets,
                        help="also write chexpert/, rsna/ and siim/ evaluation sets")
    parser.add_argument("--eval-images", type=positive_int, default=None,
                        help="CheXpert eval images (RSNA and SIIM get half); default studies/4 in [16, 5000]")
    parser.add_argument("--val-fraction", type=open_fraction, default=defaults.val_fraction,
                        help="subjects in 'validate'; with --test-fraction, below 1")
    parser.add_argument("--test-fraction", type=open_fraction, default=defaults.test_fraction, help="subjects in 'test'")
    parser.add_argument("--workers", type=positive_int, default=defaults.workers, help="worker processes (output is identical)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    return SyntheticConfig(
        out=args.out, studies=args.studies, seed=args.seed, format=ImageFormat(args.format),
        image_size=args.image_size, images_per_study=args.images_per_study, eval_sets=args.eval_sets,
        eval_images=args.eval_images, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        workers=args.workers, progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except SystemExit as stop:  # a bad option (argparse printed why: status 2) or --help (0)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        config.validate()
    except ValueError as err:
        print(f"make_synthetic: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    root = generate(config)
    print(f"wrote {config.studies} studies to {root} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
