"""Evaluation metrics against independent references (scipy, brute-force loops, hand cases)."""

import numpy as np
import pytest
import torch
from scipy import stats

from mlip_dist.evaluation import metrics as M


def _tied_binary(rng, n=200, levels=7):
    scores = rng.integers(0, levels, size=n).astype(float)  # few levels: many ties
    labels = (rng.random(n) < 0.35).astype(int)
    return scores, labels


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_mann_whitney_u_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores, labels = _tied_binary(rng)
    pos, neg = scores[labels == 1], scores[labels == 0]
    u = stats.mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert M.roc_auc(scores, labels) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)
    # The pairwise definition, P(pos > neg) + 0.5 P(tie), by brute force.
    diff = pos[:, None] - neg[None, :]
    assert M.roc_auc(scores, labels) == pytest.approx(((diff > 0) + 0.5 * (diff == 0)).mean(), abs=1e-12)


def test_auc_edge_cases_and_torch_input():
    assert M.roc_auc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert M.roc_auc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert M.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert M.roc_auc(torch.tensor([0.1, 0.7, 0.3]), torch.tensor([0, 1, 0])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        M.roc_auc([0.1, 0.2], [1, -1])


def test_average_ranks_match_scipy():
    values = np.random.default_rng(3).integers(0, 5, size=50).astype(float)
    np.testing.assert_allclose(M.average_ranks(values), stats.rankdata(values))


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_trapezoid_equals_auc_and_points(seed):
    rng = np.random.default_rng(seed)
    scores, labels = _tied_binary(rng, n=120, levels=5)
    curve = M.roc_curve(scores, labels)
    assert curve.fpr[0] == 0 and curve.tpr[0] == 0 and curve.fpr[-1] == 1 and curve.tpr[-1] == 1
    assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)
    area = float(np.sum(np.diff(curve.fpr) * (curve.tpr[1:] + curve.tpr[:-1]) / 2))
    assert area == pytest.approx(M.roc_auc(scores, labels), abs=1e-12)
    # Each point is the (FPR, TPR) of predicting score >= threshold, counted directly.
    for fpr, tpr, threshold in zip(curve.fpr[1:], curve.tpr[1:], curve.thresholds[1:], strict=True):
        predicted = scores >= threshold
        assert tpr == pytest.approx(predicted[labels == 1].mean())
        assert fpr == pytest.approx(predicted[labels == 0].mean())


def test_binary_metrics_hand_case():
    scores = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.2])
    labels = np.array([1, 0, 1, 1, 0, 0])
    result = M.binary_metrics(scores, labels, threshold=0.5)
    # predicted positive: 0.9, 0.8, 0.6 -> TP 2, FP 1, FN 1, TN 2
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 / 3)
    assert result.accuracy == pytest.approx(4 / 6)
    nothing = M.binary_metrics(scores, labels, threshold=1.5)
    assert nothing.f1 == 0.0 and nothing.precision == 0.0 and nothing.accuracy == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_f1_optimal_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores, labels = _tied_binary(rng, n=80, levels=9)
    best = M.f1_optimal_threshold(scores, labels)
    brute = max(M.binary_metrics(scores, labels, t).f1 for t in np.unique(scores))
    assert best.f1 == pytest.approx(brute, abs=1e-12)
    assert M.binary_metrics(scores, labels, best.threshold).f1 == pytest.approx(best.f1)


def test_multiclass_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert M.multiclass_accuracy(logits, [0, 1, 1, 0]) == pytest.approx(0.75)
    assert M.multiclass_accuracy(np.array([2, 1]), np.array([2, 0])) == pytest.approx(0.5)


def test_multilabel_auc_skips_single_valued_classes_and_masks_uncertain():
    rng = np.random.default_rng(0)
    scores = rng.random((40, 3))
    labels = np.stack([rng.integers(0, 2, 40), np.ones(40), rng.integers(0, 2, 40)], axis=1).astype(float)
    labels[:5, 2] = -1  # uncertain: excluded from column 2
    labels[5:8, 2] = np.nan
    result = M.multilabel_auc(scores, labels, ["a", "b", "c"])
    assert result.skipped == ["b"]
    assert set(result.per_class) == {"a", "c"}
    assert result.per_class["c"] == pytest.approx(M.roc_auc(scores[8:, 2], labels[8:, 2]))
    assert result.mean == pytest.approx((result.per_class["a"] + result.per_class["c"]) / 2)


def _brute_recall(sim, relevance, k):
    hits = 0
    for q in range(sim.shape[0]):
        ranked = sorted(range(sim.shape[1]), key=lambda j: (-sim[q, j], j))[:k]
        hits += any(relevance[q, j] for j in ranked)
    return hits / sim.shape[0]


def test_recall_at_k_vs_brute_force_index_pairing():
    rng = np.random.default_rng(1)
    sim = np.round(rng.normal(size=(30, 30)), 1)  # rounding creates ties
    sim[np.arange(30), np.arange(30)] += 0.8
    result = M.retrieval_recall(sim, ks=(1, 5, 10))
    eye = np.eye(30, dtype=bool)
    for k in (1, 5, 10):
        assert result["image_to_report"][k] == pytest.approx(_brute_recall(sim, eye, k))
        assert result["report_to_image"][k] == pytest.approx(_brute_recall(sim.T, eye, k))
    targets = rng.permutation(30)
    assert M.recall_at_k(sim, (3,), relevant=targets)[3] == pytest.approx(_brute_recall(sim, eye[targets], 3))


def test_recall_at_k_many_to_many():
    rng = np.random.default_rng(2)
    sim = rng.normal(size=(12, 20))
    relevance = rng.random((12, 20)) < 0.15
    relevance[np.arange(12), rng.integers(0, 20, 12)] = True  # every query has one
    for k in (1, 2, 5):
        assert M.recall_at_k(sim, (k,), relevant=relevance)[k] == pytest.approx(
            _brute_recall(sim, relevance, k)
        )
    hand = np.array([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    assert M.recall_at_k(hand, (1, 2), relevant=np.array([[1, 0, 1], [0, 1, 0]], bool)) == {1: 0.0, 2: 0.5}
    with pytest.raises(ValueError, match="no relevant"):
        M.recall_at_k(hand, (1,), relevant=np.zeros((2, 3), bool))


def test_dice_and_iou_hand_cases():
    pred = np.zeros((4, 4), bool)
    target = np.zeros((4, 4), bool)
    pred[0, :2] = True  # 2 pixels
    target[0, 1:4] = True  # 3 pixels, overlap 1
    assert M.dice_per_image(pred, target)[0] == pytest.approx(2 * 1 / 5)
    assert M.iou_per_image(pred, target)[0] == pytest.approx(1 / 4)
    empty = np.zeros((4, 4), bool)
    batch_pred = np.stack([pred, empty, empty, target])
    batch_target = np.stack([target, empty, target, target])
    np.testing.assert_allclose(M.dice_per_image(batch_pred, batch_target), [0.4, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(M.iou_per_image(batch_pred, batch_target), [0.25, 1.0, 0.0, 1.0])
    assert M.mean_dice(batch_pred, batch_target) == pytest.approx(0.6)
    # Probabilities are thresholded at >= 0.5; 0/255 targets count as > 0.
    probs = np.where(pred, 0.7, 0.2)
    assert M.mean_dice(torch.tensor(probs), target.astype(np.uint8) * 255) == pytest.approx(0.4)


def test_pointing_game_hand_cases():
    mask = np.zeros((8, 8), bool)
    mask[4:8, 0:4] = True  # bottom-left quadrant
    heat_in = np.zeros((2, 2))
    heat_in[1, 0] = 1.0  # coarse cell (1, 0) -> centre pixel (6, 2): inside
    heat_out = np.zeros((2, 2))
    heat_out[0, 1] = 1.0  # centre pixel (2, 6): outside
    full = np.zeros((8, 8))
    full[4, 3] = 1.0  # same resolution, on the edge of the region
    hits = M.pointing_game(np.stack([heat_in, heat_out]), np.stack([mask, mask]))
    assert hits.tolist() == [True, False]
    assert M.pointing_game(full, mask).tolist() == [True]
    with pytest.raises(ValueError, match="non-empty"):
        M.pointing_game(heat_in, np.zeros((8, 8), bool))


def test_bootstrap_ci_mean_matches_normal_theory():
    data = np.random.default_rng(0).normal(2.0, 1.0, size=400)
    ci = M.bootstrap_ci(lambda x: float(np.mean(x)), data, n_resamples=2000, seed=1)
    half_width = 1.96 * data.std(ddof=1) / np.sqrt(data.size)
    assert ci.estimate == pytest.approx(data.mean())
    assert ci.low == pytest.approx(data.mean() - half_width, abs=0.02)
    assert ci.high == pytest.approx(data.mean() + half_width, abs=0.02)
    assert M.bootstrap_ci(np.mean, data, n_resamples=50, seed=1) == M.bootstrap_ci(
        np.mean, data, n_resamples=50, seed=1
    )


def test_bootstrap_ci_pairs_arrays_and_counts_failures():
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.linspace(1, 0, 8)
    ci = M.bootstrap_ci(M.roc_auc, scores, labels, n_resamples=200, seed=0)
    assert ci.estimate == 1.0 and ci.low == 1.0 and ci.high == 1.0  # resampling keeps pairs together
    assert 0 < ci.n_failed < 200  # resamples without the one positive have no AUC
