"""MLIP losses against plain references (METHOD.md, Losses 1-4), single process, simulated ranks."""

from __future__ import annotations

import math

import ot
import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool

from mlip_dist.config import IntegrityMode, LossConfig
from mlip_dist.losses.composite import MLIPLoss
from mlip_dist.losses.global_contrastive import (
    LogitScale,
    global_contrastive_loss,
    global_contrastive_partial,
)
from mlip_dist.losses.integrity import LearnedIntegrity, relative_integrity, relative_integrity_scores
from mlip_dist.losses.local_ot import local_ot_loss, local_ot_partial, ot_distance_grid
from mlip_dist.losses.ot import sinkhorn_log
from mlip_dist.losses.reconstruction import gather_patches, patchify, reconstruction_loss, unpatchify
from mlip_dist.models.output import MLIPOutput


def _unit(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _sentence_mask(n: int, slots: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, slots + 1, (n,), generator=g)
    return torch.arange(slots)[None] < counts[:, None]


# ---------------------------------------------------------------- global contrastive (Losses 1)


def test_global_loss_matches_two_cross_entropies_and_unit_weights():
    v, r = _unit(12, 16, seed=0), _unit(12, 16, seed=1)
    scale = torch.tensor(1 / 0.07)
    logits = scale * v @ r.t()
    target = torch.arange(12)
    reference = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    assert torch.allclose(global_contrastive_loss(v, r, scale), reference, atol=1e-6)
    assert torch.allclose(global_contrastive_loss(v, r, scale, torch.ones(12)), reference, atol=1e-6)
    w = torch.rand(12, generator=torch.Generator().manual_seed(2)) * 2
    weighted = (
        w * (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.t(), target, reduction="none"))
    ).sum() / 24
    assert torch.allclose(global_contrastive_loss(v, r, scale, w), weighted, atol=1e-6)


def test_global_partials_over_simulated_ranks_sum_to_full_loss_and_gradient():
    world, n = 3, 4
    v = _unit(world * n, 8, seed=3).requires_grad_()
    r = _unit(world * n, 8, seed=4).requires_grad_()
    w = torch.rand(world * n, generator=torch.Generator().manual_seed(5))
    scale = torch.tensor(20.0)
    full = global_contrastive_partial(v, r, v, r, scale, w, offset=0)
    grad_full = torch.autograd.grad(full, (v, r))
    parts = [
        global_contrastive_partial(v[k * n : (k + 1) * n], r[k * n : (k + 1) * n], v, r, scale, w[k * n : (k + 1) * n], k * n)
        for k in range(world)
    ]
    total = torch.stack(parts).sum()
    assert torch.allclose(total, full, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(total, (v, r)), grad_full, strict=True):
        assert torch.allclose(got, want, atol=1e-7)


def test_logit_scale_init_and_clamp():
    module = LogitScale()
    assert float(module().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        module.t.fill_(10.0)
    assert float(module().detach()) == pytest.approx(100.0)
    module().backward()
    assert float(module.t.grad) == 0.0  # at the cap, t gets no gradient


# ---------------------------------------------------------------- integrity (Losses 2)


def test_relative_integrity_mean_one_no_grad_and_matches_formula():
    v, full, r = _unit(10, 8, seed=6).requires_grad_(), _unit(10, 8, seed=7), _unit(10, 8, seed=8)
    w = relative_integrity(v, full, r, clip_max=2.0)
    assert not w.requires_grad
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    q = lambda x: (1 + (x * r).sum(-1)) / 2  # noqa: E731  features are unit norm
    a = (q(v.detach()) / q(full).clamp(min=1e-6)).clamp(0, 2)
    assert torch.allclose(w, a / a.mean(), atol=1e-6)
    # Global renormalisation: raw scores of every rank enter the mean.
    raw = relative_integrity_scores(v, full, r)
    assert torch.allclose(raw, a, atol=1e-6)


def test_relative_integrity_is_lower_when_the_mask_hides_the_described_region():
    """A tiny hand-made encoder: global feature = mean of visible patch embeddings."""
    g = torch.Generator().manual_seed(9)
    patches, dim = 16, 32
    finding = F.normalize(torch.randn(dim, generator=g), dim=0)
    region = torch.arange(4)  # the finding lies in patches 0..3
    batch = 6
    reports = finding.expand(batch, dim)  # every report describes the finding
    tokens = 0.3 * torch.randn(batch, patches, dim, generator=g)
    tokens[:, region] += finding

    def encode(visible: torch.Tensor) -> torch.Tensor:
        return F.normalize((tokens * visible[..., None]).sum(1) / visible.sum(1, keepdim=True), dim=-1)

    full = encode(torch.ones(batch, patches))
    visible = torch.ones(batch, patches)
    visible[:3, region] = 0  # images 0-2: the mask hides the region their report describes
    visible[:3, 4:8] = 0
    visible[3:, 8:16] = 0  # images 3-5: same masking ratio, region kept
    w = relative_integrity(encode(visible), full, reports)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(w[:3].max()) < float(w[3:].min())
    assert float(w[:3].max()) < 1.0 < float(w[3:].min())


def test_learned_integrity_starts_at_one_normalises_to_mean_one_and_learns():
    module = LearnedIntegrity(num_patches=6)
    mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    w = module(mask)
    assert torch.allclose(w, torch.ones(5), atol=1e-6)
    with torch.no_grad():
        module.weight.normal_(generator=torch.Generator().manual_seed(2))
    w = module(mask)
    assert float(w.detach().mean()) == pytest.approx(1.0, abs=1e-6) and float(w.detach().std()) > 1e-3
    (w * torch.arange(5.0)).sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_patches|patches"):
        module(torch.ones(5, 7, dtype=torch.bool))


# ---------------------------------------------------------------- local OT loss (Losses 3)


def _local_reference(patches, sentences, sentence_mask, eps, temperature):
    """Pair-by-pair with POT's own solver (converged), then two F.cross_entropy."""
    n = patches.shape[0]
    sigma = torch.empty(n, n, dtype=patches.dtype)
    for i in range(n):
        for j in range(n):
            s = sentences[j][sentence_mask[j]]
            cost = 1 - patches[i] @ s.t()
            k, m = cost.shape
            a = torch.full((k,), 1 / k, dtype=cost.dtype)
            b = torch.full((m,), 1 / m, dtype=cost.dtype)
            plan = ot.sinkhorn(a, b, cost.detach(), eps, method="sinkhorn_log", numItermax=20000, stopThr=1e-11)
            sigma[i, j] = 1 - (plan * cost).sum()
    target = torch.arange(n)
    logits = sigma / temperature
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def test_local_loss_and_gradient_match_pot_reference():
    n, kv, s, d = 5, 6, 4, 8
    p = _unit(n, kv, d, seed=10, dtype=torch.float64).requires_grad_()
    q = _unit(n, s, d, seed=11, dtype=torch.float64).requires_grad_()
    mask = _sentence_mask(n, s, seed=12)
    ours = local_ot_loss(p, q, mask, eps=0.1, max_iter=20000, tol=1e-12, temperature=0.1)
    ref = _local_reference(p, q, mask, eps=0.1, temperature=0.1)
    assert torch.allclose(ours.loss, ref, atol=1e-8)
    for got, want in zip(torch.autograd.grad(ours.loss, (p, q)), torch.autograd.grad(ref, (p, q)), strict=True):
        assert torch.allclose(got, want, atol=1e-8)
    assert ours.stats.marginal_error < 1e-10


@pytest.mark.parametrize("negatives", [None, 2])
def test_local_partials_over_simulated_ranks_sum_to_full_loss_and_gradient(negatives):
    world, n, kv, s, d = 3, 3, 5, 4, 8
    p = _unit(world * n, kv, d, seed=13).requires_grad_()
    q = _unit(world * n, s, d, seed=14).requires_grad_()
    mask = _sentence_mask(world * n, s, seed=15)
    v, r = _unit(world * n, d, seed=16), _unit(world * n, d, seed=17)
    sim = v @ r.t()
    # tol=0: a fixed iteration count makes every pair's plan independent of how pairs are chunked
    # (with early stopping, chunks stop at different iterations and agree only to the tolerance).
    kw = {"negatives": negatives, "chunk_pairs": 7, "tol": 0.0}

    def partial(lo: int, hi: int):
        return local_ot_partial(
            p[lo:hi], p, q[lo:hi], q, mask[lo:hi], mask, offset=lo,
            similarity_rows=sim[lo:hi], similarity_cols=sim.t()[lo:hi], **kw,
        )[0]  # fmt: skip

    full = partial(0, world * n)
    grad_full = torch.autograd.grad(full, (p, q))
    total = sum(partial(k * n, (k + 1) * n) for k in range(world))
    assert torch.allclose(total, full, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(total, (p, q)), grad_full, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_local_negatives_all_equals_full_and_k_restricts_softmax():
    n, kv, s, d = 6, 5, 3, 8
    p, q = _unit(n, kv, d, seed=18), _unit(n, s, d, seed=19)
    mask = _sentence_mask(n, s, seed=20)
    v, r = _unit(n, d, seed=21), _unit(n, d, seed=22)
    full = local_ot_loss(p, q, mask).loss
    everything = local_ot_loss(p, q, mask, image_global=v, report_global=r, negatives=n - 1).loss
    assert torch.allclose(everything, full, atol=1e-6)
    # k = 1: each row/column is a 2-way softmax between the positive and its hardest negative.
    d_all, _ = ot_distance_grid(p, q, torch.ones(n, kv, dtype=torch.bool), mask)
    logits = (1 - d_all) / 0.1
    sim = v @ r.t()
    hard_row = sim.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf).argmax(1)
    hard_col = sim.t().masked_fill(torch.eye(n, dtype=torch.bool), -math.inf).argmax(1)
    idx = torch.arange(n)
    rows = -F.log_softmax(torch.stack([logits[idx, idx], logits[idx, hard_row]], 1), 1)[:, 0]
    cols = -F.log_softmax(torch.stack([logits[idx, idx], logits[hard_col, idx]], 1), 1)[:, 0]
    one = local_ot_loss(p, q, mask, image_global=v, report_global=r, negatives=1).loss
    assert torch.allclose(one, (rows.sum() + cols.sum()) / (2 * n), atol=1e-6)


def test_chunking_does_not_change_the_loss():
    n, kv, s, d = 7, 5, 4, 8
    p, q = _unit(n, kv, d, seed=23), _unit(n, s, d, seed=24)
    mask = _sentence_mask(n, s, seed=25)
    big = local_ot_loss(p, q, mask, chunk_pairs=4096, tol=0.0)
    for chunk in (1, 3, 10):
        small = local_ot_loss(p, q, mask, chunk_pairs=chunk, tol=0.0)
        assert torch.allclose(small.loss, big.loss, atol=1e-6)
    assert big.stats.pairs == n * n  # every pair solved once, used for its row and its column


def test_padding_sentences_and_patches_changes_neither_loss_nor_gradient():
    n, kv, s, d = 5, 6, 3, 8
    p = _unit(n, kv, d, seed=26, dtype=torch.float64).requires_grad_()
    q = _unit(n, s, d, seed=27, dtype=torch.float64).requires_grad_()
    mask = _sentence_mask(n, s, seed=28)
    base = local_ot_loss(p, q, mask, max_iter=300, tol=1e-12).loss
    grad_base = torch.autograd.grad(base, (p, q))
    # Padded slots get arbitrary (even large) features.
    extra_p = 5 * torch.randn(n, 3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    extra_q = 5 * torch.randn(n, 2, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    p2 = torch.cat([p, extra_p], 1)
    q2 = torch.cat([q, extra_q], 1)
    patch_mask = torch.cat([torch.ones(n, kv, dtype=torch.bool), torch.zeros(n, 3, dtype=torch.bool)], 1)
    mask2 = torch.cat([mask, torch.zeros(n, 2, dtype=torch.bool)], 1)
    padded = local_ot_loss(p2, q2, mask2, patch_mask=patch_mask, max_iter=300, tol=1e-12).loss
    assert torch.allclose(padded, base, atol=1e-12)
    for got, want in zip(torch.autograd.grad(padded, (p, q)), grad_base, strict=True):
        assert torch.allclose(got, want, atol=1e-12)


def test_envelope_gradient_equals_finite_difference_of_entropic_ot_value():
    """dOT_eps/dC = T* for OT_eps(C) = min_T <T, C> - eps H(T): checked by central differences, float64."""
    eps = 0.1
    g = torch.Generator().manual_seed(29)
    cost = torch.rand(1, 7, 4, generator=g, dtype=torch.float64)
    direction = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)

    def ot_value(c: torch.Tensor) -> float:
        plan = sinkhorn_log(c, eps=eps, max_iter=20000, tol=1e-14).plan
        entropy = -(plan * (plan.log() - 1)).sum()
        return float((plan * c).sum() - eps * entropy)

    h = 1e-5
    numeric = (ot_value(cost + h * direction) - ot_value(cost - h * direction)) / (2 * h)
    # d_ij = <T*, C> with the plan detached: autograd gives exactly T* as dC.
    c = cost.clone().requires_grad_()
    plan = sinkhorn_log(c, eps=eps, max_iter=20000, tol=1e-14).plan
    (plan * c).sum().backward()
    assert torch.allclose(c.grad, plan)
    analytic = float((c.grad * direction).sum())
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_local_loss_never_nan_with_tiny_eps_identical_features_and_empty_reports():
    n, kv, s, d = 4, 6, 3, 8
    p = _unit(1, 1, d, seed=30).expand(n, kv, d).clone().requires_grad_()  # identical features everywhere
    q = _unit(1, 1, d, seed=30).expand(n, s, d).clone().requires_grad_()
    mask = _sentence_mask(n, s, seed=31)
    mask[2] = False  # a report with no valid sentence: left out of the local loss
    for eps in (1e-3, 0.05):
        out = local_ot_loss(p, q, mask, eps=eps)
        grads = torch.autograd.grad(out.loss, (p, q))
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
        # 3 valid pairs, all similarities equal: each term is log 3, 6 terms over 2N = 8.
        assert float(out.loss.detach()) == pytest.approx(6 * math.log(3) / 8, rel=1e-5)
        assert torch.count_nonzero(grads[1][2]) == 0


def test_local_loss_with_fixed_iterations_never_syncs_and_agrees_with_the_tolerance_stop():
    n, kv, s, d = 6, 5, 4, 8
    p = _unit(n, kv, d, seed=32).requires_grad_()
    q = _unit(n, s, d, seed=33).requires_grad_()
    mask = _sentence_mask(n, s, seed=34)
    counter = load_tool("bench_ot").DispatchCounter
    results = {}
    for fixed in (False, True):
        with counter() as forward:
            out = local_ot_loss(p, q, mask, eps=0.05, max_iter=200, tol=1e-5, chunk_pairs=10, fixed_iterations=fixed)
        with counter() as backward:
            grads = torch.autograd.grad(out.loss, (p, q))
        results[fixed] = (out, grads, forward.host_syncs + backward.host_syncs)
    (adaptive, adaptive_grads, adaptive_syncs), (fixed, fixed_grads, fixed_syncs) = results[False], results[True]
    # 36 pairs in 6 chunks (one image each), each checked at least once by default; none with fixed iterations.
    assert fixed_syncs == 0 and adaptive_syncs >= 6 and fixed.stats.iterations == 200
    assert fixed.stats.marginal_error <= adaptive.stats.marginal_error < 1e-5
    # |d_fixed - d_adaptive| is a fraction of the tolerance; the loss moves by less than tol / tau.
    assert abs(float(fixed.loss.detach() - adaptive.loss.detach())) <= 1e-5 / 0.1
    for got, want in zip(fixed_grads, adaptive_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------- reconstruction (Losses 4)


def test_patchify_order_and_roundtrip():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # Patch 4 = grid row 1, col 1; pixel (0, 0) of channel 2 sits at position 2 in (p, p, C) order.
    assert patches[1, 4, 2] == images[1, 2, 4, 4]
    assert torch.equal(unpatchify(patches, 4, (2, 3), 3), images)
    assert torch.equal(gather_patches(patches, torch.tensor([[5, 0], [1, 1]]))[0, 0], patches[0, 5])


def test_reconstruction_per_patch_normalisation_matches_hand_computation():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0]]])
    prediction = torch.tensor([[[0.0, 0.5, -0.5, 1.0]]])
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased, as MAE
    normed = [(x - mean) / math.sqrt(var + 1e-6) for x in (1.0, 2.0, 3.0, 6.0)]
    expected = sum((p - t) ** 2 for p, t in zip((0.0, 0.5, -0.5, 1.0), normed, strict=True)) / 4
    assert float(reconstruction_loss(prediction, target)) == pytest.approx(expected, rel=1e-6)
    raw = sum((p - t) ** 2 for p, t in zip((0.0, 0.5, -0.5, 1.0), (1.0, 2.0, 3.0, 6.0), strict=True)) / 4
    assert float(reconstruction_loss(prediction, target, norm_pix=False)) == pytest.approx(raw, rel=1e-6)


def test_reconstruction_ignores_visible_patches():
    g = torch.Generator().manual_seed(32)
    prediction = torch.randn(3, 10, 12, generator=g).requires_grad_()
    target = torch.randn(3, 10, 12, generator=g)
    masked = torch.rand(3, 10, generator=g) > 0.5
    base = reconstruction_loss(prediction, target, masked)
    changed = prediction.detach().clone()
    changed[~masked] = 1e3 * torch.randn(int((~masked).sum()), 12, generator=g)
    assert float(reconstruction_loss(changed, target, masked)) == float(base.detach())
    base.backward()
    assert torch.count_nonzero(prediction.grad[~masked]) == 0
    # Equals the loss on the masked patches alone.
    alone = reconstruction_loss(prediction[masked][None], target[masked][None])
    assert torch.allclose(alone, base)


# ---------------------------------------------------------------- composite


def _output(n: int = 6, seed: int = 40, grad: bool = True) -> MLIPOutput:
    kv, k, s, d, km, pix = 5, 10, 4, 8, 5, 12
    g = torch.Generator().manual_seed(seed)
    return MLIPOutput(
        image_global=_unit(n, d, seed=seed).requires_grad_(grad),
        report_global=_unit(n, d, seed=seed + 1).requires_grad_(grad),
        patch_features=_unit(n, kv, d, seed=seed + 2).requires_grad_(grad),
        visible_patch_idx=torch.arange(kv).expand(n, kv),
        sentence_features=_unit(n, s, d, seed=seed + 3).requires_grad_(grad),
        sentence_mask=_sentence_mask(n, s, seed=seed + 4),
        visibility_mask=torch.arange(k).expand(n, k) < kv,
        logit_scale=torch.tensor(1 / 0.07),
        image_global_full=_unit(n, d, seed=seed + 5),
        reconstruction=torch.randn(n, km, pix, generator=g).requires_grad_(grad),
        masked_patch_idx=torch.arange(kv, k).expand(n, km),
        reconstruction_target=torch.randn(n, km, pix, generator=g),
    )


def test_composite_is_the_weighted_sum_of_the_terms():
    out = _output()
    config = LossConfig(lambda_global=0.5, lambda_local=2.0, lambda_reconstruction=0.25)
    result = MLIPLoss(config)(out)
    w = relative_integrity(out.image_global, out.image_global_full, out.report_global)
    g = global_contrastive_loss(out.image_global, out.report_global, out.logit_scale, w)
    loc = local_ot_loss(out.patch_features, out.sentence_features, out.sentence_mask).loss
    rec = reconstruction_loss(out.reconstruction, out.reconstruction_target)
    assert torch.allclose(result.global_loss, g) and torch.allclose(result.local_loss, loc)
    assert torch.allclose(result.reconstruction_loss, rec)
    assert torch.allclose(result.total, 0.5 * g + 2.0 * loc + 0.25 * rec)
    assert result.stats.integrity_mean == pytest.approx(1.0, abs=1e-6)
    assert result.stats.ot_iterations >= 1 and result.stats.ot_pairs == 6 * 6  # each pair solved once
    assert set(result.scalars()) >= {"loss/total", "ot/marginal_error", "integrity/std"}
    result.total.backward()
    assert out.patch_features.grad is not None and out.image_global.grad is not None


def test_composite_integrity_modes():
    out = _output(grad=False)
    none = MLIPLoss(LossConfig(integrity=IntegrityMode.NONE))(out)
    assert torch.equal(none.integrity_weights, torch.ones(6))
    learned = MLIPLoss(LossConfig(integrity=IntegrityMode.LEARNED), num_patches=10)
    assert sum(p.numel() for p in learned.parameters()) == 11
    # Learned weights start at 1, so the loss equals the unweighted one.
    assert torch.allclose(learned(out).total, none.total, atol=1e-6)
    out.image_global_full = None
    with pytest.raises(ValueError, match="image_global_full"):
        MLIPLoss(LossConfig())(out)
    with pytest.raises(ValueError, match="num_patches"):
        MLIPLoss(LossConfig(integrity=IntegrityMode.LEARNED))


def test_composite_passes_the_solver_options_to_the_local_loss(monkeypatch):
    import mlip_dist.losses.composite as composite

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return local_ot_loss(*args, **kwargs)

    monkeypatch.setattr(composite, "local_ot_loss", spy)
    config = LossConfig(lambda_global=0.0, lambda_reconstruction=0.0, ot_fixed_iterations=True, ot_max_iter=7)
    result = MLIPLoss(config)(_output(grad=False))
    assert seen["fixed_iterations"] is True and seen["compiled"] is False and seen["max_iter"] == 7
    assert result.stats.ot_iterations == 7
