#!/usr/bin/env python
"""Benchmark make_shards against a bare decode-resize-encode loop (images/s).

Builds a synthetic-like MIMIC-CXR DICOM tree (default 2000x2500, 12-bit, uncompressed, noise plus
smooth structure, VOI window in the header), then times:

* bare: one process, ``read_dicom`` + area resize to --size + 8-bit PNG encode, nothing else;
* make_shards with 1 worker and with 2 workers (the full pipeline: CSVs, reports, tar, manifest).

Prints images/s and the ratios (targets: overhead <= 15 % with 1 worker; >= 1.7x with 2).

    python tools/bench_make_shards.py [--images 48] [--height 2500 --width 2000] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_tree(root: Path, images: int, height: int, width: int) -> None:
    from mimic_fixtures import (
        REPORT_FULL,
        StudySpec,
        _write_csv_gz,
        _write_reports,
        _write_shared_csvs,
        write_dicom,
    )

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    structure = 1500 + 900 * np.sin(xx / 230.0) * np.cos(yy / 310.0)
    studies, records = [], []
    for i in range(images):
        spec = StudySpec(10000000 + i, 50000000 + i, "train", REPORT_FULL, [(f"img{i:05d}", "PA", "ok12")])
        studies.append(spec)
        rel = f"files/p{str(spec.subject_id)[:2]}/p{spec.subject_id}/s{spec.study_id}/img{i:05d}.dcm"
        pixels = np.clip(structure + rng.normal(0, 120, (height, width)), 0, 4095).astype(np.uint16)
        write_dicom(root / rel, pixels, window=(1500.0, 3000.0))
        records.append([spec.subject_id, spec.study_id, f"img{i:05d}", rel])
    _write_csv_gz(root / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
    _write_reports(root, studies)
    _write_shared_csvs(root, studies)


def bare_loop(root: Path, size: int) -> float:
    from mlip_dist.data.dicom import read_dicom
    from mlip_dist.data.imaging import ImageFormat, encode, quantize, resize_shorter_side

    paths = sorted(root.glob("files/**/*.dcm"))
    start = time.perf_counter()
    for path in paths:
        encode(quantize(resize_shorter_side(read_dicom(path).pixels, size), 8), ImageFormat.PNG)
    return len(paths) / (time.perf_counter() - start)


def pipeline(root: Path, out: Path, size: int, workers: int) -> float:
    from mlip_dist.data.shard_writer import PackOptions, pack

    shutil.rmtree(out, ignore_errors=True)
    summary = pack(PackOptions(root=root, out=out, size=size, workers=workers, progress=False, shard_size=16))
    return summary.packed / summary.seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=2500)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_make_shards_"))
    root = work / "mimic"
    t0 = time.perf_counter()
    build_tree(root, args.images, args.height, args.width)
    print(f"built {args.images} DICOMs {args.height}x{args.width} 12-bit in {time.perf_counter() - t0:.1f} s")
    print(f"cpu count {os.cpu_count()}, load average before {os.getloadavg()}")
    bare_loop(root, args.size)  # warm the page cache so every variant reads from memory
    bare = bare_loop(root, args.size)
    one = pipeline(root, work / "out1", args.size, 1)
    two = pipeline(root, work / "out2", args.size, 2)
    identical = all(
        (work / "out1" / p.name).read_bytes() == p.read_bytes() for p in sorted((work / "out2").glob("*.tar"))
    )
    print(f"bare loop       : {bare:6.2f} img/s")
    print(f"make_shards w=1 : {one:6.2f} img/s  overhead {100 * (bare / one - 1):+.1f} % (target <= 15 %)")
    print(f"make_shards w=2 : {two:6.2f} img/s  speed-up {two / one:.2f}x over w=1 (target >= 1.7x)")
    print(f"w=1 and w=2 shards byte-identical: {identical}")
    print(f"load average after {os.getloadavg()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
