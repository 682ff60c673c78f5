#!/usr/bin/env python
"""How high can image-to-report Recall@K go on a split when reports are told apart only by their findings?

    python tools/retrieval_ceiling.py --shards runs/big/shards [--split test] [--ks 1 5 10] [--seed 0]

An oracle that knows every image's and every report's CheXpert label set exactly ranks the reports by how
many of the 14 labels differ from the image's (positive = 1, anything else = 0) and orders reports with the
same label set at random. On a synthetic MIMIC-CXR many studies share a label set (for example "No Finding"
alone), and within such a group only the report's wording, not its findings, can single out the right one.
The Recall@K it prints is therefore what a model that recognises every finding perfectly, and nothing else,
would reach: the ceiling that docs/RESULTS.md compares the study's image-to-report Recall@10 against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlip_dist.data.loader import iterate_tar_samples, read_dataset_info  # noqa: E402
from mlip_dist.data.mimic import CHEXPERT_LABELS  # noqa: E402
from mlip_dist.evaluation.metrics import retrieval_recall  # noqa: E402


def label_set_recall(labels: np.ndarray, ks: tuple[int, ...], seed: int = 0) -> dict[str, dict[int, float]]:
    """Recall@K of ranking by the number of differing labels, ties in random order (``labels``: (N, C) 0/1)."""
    labels = np.asarray(labels, dtype=np.float64)
    distance = np.abs(labels[:, None, :] - labels[None, :, :]).sum(-1)
    # the tie-break is below one label's difference, so it only orders reports with the same label set
    ties = 1e-3 * np.random.default_rng(seed).random(distance.shape)
    return retrieval_recall(-distance + ties, ks=ks)


def split_labels(shards: Path, split: str) -> np.ndarray:
    """The (N, 14) positive-label matrix of ``split``, in shard order."""
    def on_error(shard: str, exc: Exception) -> None:
        print(f"warning: {shard}: {exc}", file=sys.stderr)

    rows = []
    for shard in read_dataset_info(shards, split).shards:
        for sample in iterate_tar_samples(shard, on_error):
            found = json.loads(sample["json"]).get("labels", {})
            rows.append([found.get(name) == 1 for name in CHEXPERT_LABELS])
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(CHEXPERT_LABELS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = split_labels(args.shards, args.split)
    if len(labels) == 0:
        raise SystemExit(f"{args.shards}: the {args.split} split has no samples")
    groups = len({tuple(row) for row in labels})
    recall = label_set_recall(labels, tuple(args.ks), args.seed)
    print(f"{args.split}: {len(labels)} pairs, {groups} distinct label sets")
    for direction, values in recall.items():
        print(f"  {direction}: " + ", ".join(f"R@{k} {values[k]:.3f}" for k in args.ks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
