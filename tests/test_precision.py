"""bf16 correctness of one training step against a float64 reference (tools/bench_gpu.py, on the CPU).

The same module, batch and patch mask in float64, float32, bf16 autocast and bf16 weights (DeepSpeed's
bf16 mode). A change that, say, ran the Sinkhorn solve in bf16 or lost the float32 up-casts of the
losses would move these errors by orders of magnitude.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from mlip_dist.models.presets import tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_gpu():
    sys.path.insert(0, str(REPO / "tools"))  # bench_gpu imports its sibling bench_pretrain
    return importlib.import_module("bench_gpu")


def test_bf16_step_matches_the_float64_reference(bench_gpu):
    model_cfg = tiny()
    batch = bench_gpu.synthetic_batch(model_cfg, 4, 32, 4)
    results = bench_gpu.compare_precisions(model_cfg, batch, torch.device("cpu"), seed=0)
    reference = results["float64 (reference)"].terms
    assert all(value > 0 for value in reference.values())
    float32 = results["float32"]
    assert max(float32.terms.values()) < 1e-5
    assert float32.gradients["all"][0] > 1 - 1e-9 and float32.gradients["all"][1] < 1e-4
    for name in ("bf16 autocast", "bf16 weights"):
        bf16 = results[name]
        assert max(bf16.terms.values()) < 2e-2, (name, bf16.terms)
        assert bf16.terms["local_loss"] < 1e-3, (name, bf16.terms)  # the OT solve runs in float32
        for part, (cosine, relative) in bf16.gradients.items():
            assert cosine > 0.995 and relative < 0.1, (name, part, cosine, relative)
        assert bf16.gradients["all"][1] > float32.gradients["all"][1]  # bf16 is really in use
    assert set(results["bf16 weights"].gradients) >= {"all", "image_encoder", "text_encoder", "decoder"}
