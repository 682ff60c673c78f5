"""train.compile: torch.compile of the encoders gives the eager loss and gradients (issue 17, point 5)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch


@pytest.mark.slow
def test_compiled_encoders_match_eager_on_the_cpu():
    from conftest import load_tool

    from mlip_dist.config import LossConfig
    from mlip_dist.models.presets import tiny
    from mlip_dist.training.engine import compile_encoders
    from mlip_dist.training.module import MLIPTrainingModule

    synthetic_batch = load_tool("bench_pretrain").synthetic_batch
    torch.manual_seed(0)
    config = tiny()
    eager = MLIPTrainingModule(config, LossConfig(), rank=0, world_size=1)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints unchanged
    for seed, tokens in ((0, 24), (1, 30)):  # a second report length: dynamic text shapes
        batch = synthetic_batch(config, batch=4, tokens=tokens, sentences=3, seed=seed)
        losses = []
        for module in (eager, compiled):
            module.zero_grad()
            loss, _ = module(dataclasses.replace(batch, mask_seeds=torch.arange(4) + 100 * seed))
            loss.backward()
            losses.append(loss.detach())
        assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5), losses
        for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), name
