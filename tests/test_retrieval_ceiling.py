"""tools/retrieval_ceiling.py: Recall@K of an oracle that knows every study's label set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_tool

from mlip_dist.data.loader import iterate_tar_samples, read_dataset_info
from mlip_dist.data.mimic import CHEXPERT_LABELS


@pytest.fixture(scope="module")
def ceiling():
    return load_tool("retrieval_ceiling")


def test_distinct_label_sets_are_retrieved_exactly(ceiling):
    labels = np.eye(6)  # six studies, each with its own single finding
    recall = ceiling.label_set_recall(labels, ks=(1, 2))
    assert recall["image_to_report"][1] == 1.0 and recall["report_to_image"][1] == 1.0


def test_within_a_shared_label_set_only_chance_remains(ceiling):
    # 50 groups of 4 studies with the same label set: the right report is one of 4 equally good ones
    groups = np.array([[(g >> bit) & 1 for bit in range(6)] for g in range(50)], dtype=float)
    labels = np.repeat(groups, 4, axis=0)
    recall = ceiling.label_set_recall(labels, ks=(1, 2, 4), seed=3)
    assert recall["image_to_report"][4] == 1.0  # the group always fills the first 4 places
    assert abs(recall["image_to_report"][1] - 0.25) < 0.06  # 200 queries, expectation 1/4
    assert abs(recall["image_to_report"][2] - 0.50) < 0.07


def test_command_reads_the_split_labels_from_the_shards(ceiling, synthetic_shards, capsys):
    assert ceiling.main(["--shards", str(synthetic_shards), "--split", "test", "--ks", "1", "10"]) == 0
    printed = capsys.readouterr().out
    expected = []  # the labels, read independently with the loader
    for shard in read_dataset_info(synthetic_shards, "test").shards:
        for sample in iterate_tar_samples(shard, lambda shard, exc: None):
            labels = json.loads(sample["json"])["labels"]
            expected.append(tuple(labels.get(name) == 1 for name in CHEXPERT_LABELS))
    assert f"test: {len(expected)} pairs, {len(set(expected))} distinct label sets" in printed
    recall = ceiling.label_set_recall(np.array(expected, dtype=float), ks=(1, 10))
    assert f"R@10 {recall['image_to_report'][10]:.3f}" in printed
