"""sinkhorn_log against POT (independent reference), padding, and stability (METHOD.md, Losses 3)."""

from __future__ import annotations

import ot
import ot.batch
import pytest
import torch
from conftest import load_tool

from mlip_dist.losses.ot import sinkhorn_log

# The bench's counter of dispatched aten ops; ``host_syncs`` counts those that copy a value to the host.
DispatchCounter = load_tool("bench_ot").DispatchCounter


def _random_problems(batch: int, rows: int, cols: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    feats_a = torch.nn.functional.normalize(torch.randn(batch, rows, 8, generator=g, dtype=dtype), dim=-1)
    feats_b = torch.nn.functional.normalize(torch.randn(batch, cols, 8, generator=g, dtype=dtype), dim=-1)
    return 1 - feats_a @ feats_b.transpose(1, 2)  # cosine costs in [0, 2], like the local loss


@pytest.mark.parametrize("shape", [(3, 7, 4), (2, 20, 16), (4, 1, 5), (2, 9, 1)])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.5])
def test_converged_plan_matches_pot_sinkhorn_log(shape, eps):
    cost = _random_problems(*shape, seed=hash((shape, eps)) % 1000)
    ours = sinkhorn_log(cost, eps=eps, max_iter=20000, tol=1e-12)
    for b in range(shape[0]):
        a = torch.full((shape[1],), 1 / shape[1], dtype=torch.float64)
        c = torch.full((shape[2],), 1 / shape[2], dtype=torch.float64)
        ref = ot.sinkhorn(a, c, cost[b], eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
        assert torch.allclose(ours.plan[b], ref, atol=1e-5, rtol=0)
    assert float(ours.marginal_error) < 1e-9


@pytest.mark.parametrize("iterations", [1, 7, 10, 11, 37])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_equal_iterations_match_pot_batch_log_sinkhorn(iterations, eps):
    """Not just the fixed point: every iterate equals POT's log-domain batch solver."""
    cost = _random_problems(5, 12, 6, seed=iterations)
    ours = sinkhorn_log(cost, eps=eps, max_iter=iterations, tol=0)
    ref = ot.batch.solve_batch(cost, eps, max_iter=iterations, tol=0, method="log_sinkhorn").plan
    assert ours.iterations == iterations
    assert torch.allclose(ours.plan, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("eps", [0.01, 0.05, 0.5])
def test_padded_block_matches_pot_on_unpadded_problem(eps):
    g = torch.Generator().manual_seed(3)
    batch, rows, cols = 6, 10, 7
    cost = _random_problems(batch, rows, cols, seed=11)
    n_rows = torch.randint(1, rows + 1, (batch,), generator=g)
    n_cols = torch.randint(1, cols + 1, (batch,), generator=g)
    row_mask = torch.arange(rows)[None] < n_rows[:, None]
    col_mask = torch.arange(cols)[None] < n_cols[:, None]
    padded = cost.clone()
    # Garbage in the padding must not matter.
    padded[~(row_mask[:, :, None] & col_mask[:, None, :])] = 1e4
    ours = sinkhorn_log(padded, row_mask, col_mask, eps=eps, max_iter=20000, tol=1e-12)
    for b in range(batch):
        k, m = int(n_rows[b]), int(n_cols[b])
        ref = ot.sinkhorn(
            torch.full((k,), 1 / k, dtype=torch.float64), torch.full((m,), 1 / m, dtype=torch.float64),
            cost[b, :k, :m], eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-13,
        )  # fmt: skip
        assert torch.allclose(ours.plan[b, :k, :m], ref, atol=1e-5, rtol=0)
        assert torch.count_nonzero(ours.plan[b, k:, :]) == 0
        assert torch.count_nonzero(ours.plan[b, :, m:]) == 0
        # The same solver on the unpadded problem gives the same block.
        alone = sinkhorn_log(cost[b : b + 1, :k, :m], eps=eps, max_iter=20000, tol=1e-12).plan[0]
        assert torch.allclose(ours.plan[b, :k, :m], alone, atol=1e-9, rtol=0)


def test_float32_matches_pot_batch_at_paper_eps():
    cost = _random_problems(16, 49, 16, seed=5, dtype=torch.float32)
    ours = sinkhorn_log(cost, eps=0.05, max_iter=50, tol=0)
    ref = ot.batch.solve_batch(cost.double(), 0.05, max_iter=50, tol=0, method="log_sinkhorn").plan
    assert ours.plan.dtype == torch.float32
    assert torch.allclose(ours.plan.double(), ref, atol=1e-6, rtol=0)


def test_early_stop_and_reported_marginal_error():
    cost = _random_problems(4, 30, 8, seed=9)
    result = sinkhorn_log(cost, eps=0.1, max_iter=1000, tol=1e-6, check_every=5)
    assert result.iterations < 1000 and (result.iterations - 1) % 5 == 0
    a = torch.full((30,), 1 / 30, dtype=torch.float64)
    recomputed = (result.plan.sum(2) - a).abs().sum(1).max()
    assert float(result.marginal_error) == pytest.approx(float(recomputed), abs=1e-15)
    assert float(result.marginal_error) < 1e-6
    # Columns are exact after the final column update.
    assert torch.allclose(result.plan.sum(1), torch.full((4, 8), 1 / 8, dtype=torch.float64), atol=1e-12)


def test_never_nan_tiny_eps_identical_features_all_padding():
    g = torch.Generator().manual_seed(0)
    cost = 2 * torch.rand(8, 98, 16, generator=g)
    row_mask = torch.ones(8, 98, dtype=torch.bool)
    col_mask = torch.rand(8, 16, generator=g) > 0.4
    col_mask[0] = False  # a report without any sentence
    row_mask[1] = False  # an image without any patch
    row_mask[2, 50:] = False  # padded rows inside a valid problem
    cost[3] = 0.7  # identical features: every cost equal
    for eps in (1e-3, 1e-2, 0.05):
        result = sinkhorn_log(cost, row_mask, col_mask, eps=eps, max_iter=200, tol=1e-5)
        assert torch.isfinite(result.plan).all() and torch.isfinite(result.marginal_error)
        assert torch.count_nonzero(result.plan[0]) == 0 and torch.count_nonzero(result.plan[1]) == 0
        assert torch.count_nonzero(result.plan[2, 50:]) == 0
        valid = col_mask[3]
        expected = torch.full((98, int(valid.sum())), 1 / (98 * int(valid.sum())))
        assert torch.allclose(result.plan[3][:, valid], expected, atol=1e-7)
        # Every valid problem carries unit mass.
        assert torch.allclose(result.plan[4:].sum((1, 2)), torch.ones(4), atol=1e-4)


def test_bf16_autocast_solves_in_float32():
    cost = _random_problems(4, 10, 5, seed=2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = sinkhorn_log(cost.bfloat16(), eps=0.05, max_iter=50, tol=0)
    assert result.plan.dtype == torch.float32
    ref = sinkhorn_log(cost.bfloat16().float(), eps=0.05, max_iter=50, tol=0).plan
    assert torch.allclose(result.plan, ref, atol=1e-7)


def test_no_gradient_flows_into_the_plan():
    cost = _random_problems(2, 5, 3, seed=1).requires_grad_()
    assert not sinkhorn_log(cost, eps=0.1).plan.requires_grad


def _padded_problems(seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cost = _random_problems(6, 30, 8, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    row_mask = torch.rand(6, 30, generator=g) > 0.2
    col_mask = torch.rand(6, 8, generator=g) > 0.3
    row_mask[:, 0] = col_mask[:, 0] = True
    return cost, row_mask, col_mask


@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_fixed_iterations_never_syncs_and_agrees_with_the_tolerance_stop(tol):
    cost, row_mask, col_mask = _padded_problems(seed=21)
    with DispatchCounter() as adaptive_ops:
        adaptive = sinkhorn_log(cost, row_mask, col_mask, eps=0.05, max_iter=400, tol=tol)
    with DispatchCounter() as fixed_ops:
        fixed = sinkhorn_log(cost, row_mask, col_mask, eps=0.05, max_iter=400, tol=tol, fixed_iterations=True)
    # One host read per convergence check (iterations 1, 11, 21, ...) by default; none with fixed iterations.
    assert adaptive.iterations < 400 and adaptive_ops.host_syncs == (adaptive.iterations - 1) // 10 + 1
    assert fixed_ops.host_syncs == 0 and fixed_ops.ops["aten::is_nonzero"] == 0
    assert fixed.iterations == 400
    # Same iterates as tol = 0; the marginal error is still computed (on the device) for logging.
    assert torch.equal(fixed.plan, sinkhorn_log(cost, row_mask, col_mask, eps=0.05, max_iter=400, tol=0).plan)
    a = row_mask.double() / row_mask.sum(1, keepdim=True)
    assert float(fixed.marginal_error) == pytest.approx(float((fixed.plan.sum(2) - a).abs().sum(1).max()), abs=1e-15)
    # Equal to the tolerance-stopped solve up to the tolerance (observed: plan L1 <= 1.8 tol, d <= 0.06 tol).
    assert float(fixed.marginal_error) <= float(adaptive.marginal_error) < tol
    assert float((fixed.plan - adaptive.plan).abs().sum((1, 2)).max()) <= 4 * tol
    assert float(((fixed.plan - adaptive.plan) * cost).sum((1, 2)).abs().max()) <= tol


@pytest.mark.slow
def test_compiled_solver_matches_eager():
    """torch.compile (inductor) of the solver steps: same iterations, plans equal to eager up to float32
    rounding, including a second batch size (recompiled with a dynamic batch) and float64."""
    cost, row_mask, col_mask = _padded_problems(seed=22, dtype=torch.float32)
    for options in ({"fixed_iterations": True}, {"tol": 1e-4}):
        for batch in (6, 4):
            args = (cost[:batch], row_mask[:batch], col_mask[:batch])
            eager = sinkhorn_log(*args, eps=0.05, max_iter=23, **options)
            compiled = sinkhorn_log(*args, eps=0.05, max_iter=23, compiled=True, **options)
            assert compiled.iterations == eager.iterations
            assert torch.allclose(compiled.plan, eager.plan, atol=1e-7, rtol=1e-5), (options, batch)
            assert torch.count_nonzero(compiled.plan[~(row_mask[:batch, :, None] & col_mask[:batch, None, :])]) == 0
