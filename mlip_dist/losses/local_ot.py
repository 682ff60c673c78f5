"""Sentence-patch matching by optimal transport: the local loss (METHOD.md, Losses 3).

For image i and report j::

    C_ij[k, l] = 1 - <p_ik, s_jl>          visible patches k, valid sentences l
    T*_ij      = sinkhorn_log(C_ij)          no gradient
    d_ij       = <T*_ij, C_ij>               gradient to the features through C only
    sigma_ij   = 1 - d_ij
    L_local    = -1/(2N) sum_i [ log softmax_j(sigma_i. / tau)_i + log softmax_j(sigma_.i / tau)_i ]

Why the detached plan is the right gradient (envelope theorem): the entropic OT
value OT_eps(C) = min_T <T, C> - eps H(T) over the transport polytope has
dOT_eps/dC = T*(C). So the gradient that d_ij passes to C, namely T*_ij, is the
exact gradient of OT_eps (not of <T*(C), C>, whose derivative would add the
dT*/dC term). ``tests/test_losses.py`` checks this against finite differences.

Sharding: rank r computes sigma for (its local images) x (all reports) and for
(all images) x (its local reports), in chunks of at most ``chunk_pairs`` pairs;
no rank ever holds the N x N x K x M cost tensor. Option ``negatives=k`` keeps,
per row/column, the positive plus the k hardest negatives by global similarity.

Pairs whose image has no valid patch or whose report has no valid sentence are
left out: they are not a positive and not a negative (an empty report would
otherwise have d = 0, the best possible similarity). The normaliser stays 2N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mlip_dist.distributed import gather_no_grad, gather_with_grad, max_over_ranks, pad_dim_to
from mlip_dist.losses.ot import sinkhorn_log

__all__ = [
    "LocalOTOutput",
    "OTStats",
    "local_ot_loss",
    "local_ot_partial",
    "ot_distance_grid",
    "ot_distance_pairs",
]


@dataclass
class OTStats:
    """Solver statistics for logging: max iterations and max L1 marginal error over all chunks."""

    iterations: int
    marginal_error: torch.Tensor  # 0-dim, detached
    pairs: int

    @staticmethod
    def merge(parts: list[OTStats], device: torch.device) -> OTStats:
        if not parts:
            return OTStats(0, torch.zeros((), device=device), 0)
        return OTStats(
            iterations=max(p.iterations for p in parts),
            marginal_error=torch.stack([p.marginal_error.float() for p in parts]).max(),
            pairs=sum(p.pairs for p in parts),
        )


@dataclass
class LocalOTOutput:
    loss: torch.Tensor
    stats: OTStats


@dataclass
class _Solver:
    eps: float
    max_iter: int
    tol: float

    def distance(
        self, cost: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor
    ) -> tuple[torch.Tensor, OTStats]:
        """d = <T*, C> per problem of a (P, K, M) cost; T* from a no-grad solve."""
        result = sinkhorn_log(cost.detach(), row_mask, col_mask, self.eps, self.max_iter, self.tol)
        distance = (result.plan * cost).sum(dim=(1, 2))
        return distance, OTStats(result.iterations, result.marginal_error.detach(), cost.shape[0])


def _cost(patches: torch.Tensor, sentences: torch.Tensor, equation: str) -> torch.Tensor:
    # fp32 whatever the autocast: cost errors are amplified by 1/eps in the plan.
    dtype = torch.float64 if patches.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=patches.device.type, enabled=False):
        return 1.0 - torch.einsum(equation, patches.to(dtype), sentences.to(dtype))


def paired_plans(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    patch_mask: torch.Tensor | None,
    sentence_mask: torch.Tensor | None,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> torch.Tensor:
    """T*_ii (B, K, M) between each image's patches (B, K, d) and its own sentences (B, M, d), no gradient.

    The plan whose rows are the grounding heat maps (METHOD.md, Losses 3 and Evaluation: Grounding).
    """
    cost = _cost(patches, sentences, "bkd,bmd->bkm")
    return sinkhorn_log(cost.detach(), patch_mask, sentence_mask, eps, max_iter, tol).plan


def ot_distance_grid(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    patch_mask: torch.Tensor,
    sentence_mask: torch.Tensor,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
    chunk_pairs: int = 4096,
) -> tuple[torch.Tensor, OTStats]:
    """OT distances d_ij for every image i in ``patches`` (A, K, d) and report j in ``sentences`` (R, S, d).

    Returns (A, R) distances (differentiable w.r.t. both feature tensors) and solver stats.
    At most ``chunk_pairs`` (i, j) pairs are solved at once; cost blocks come from one
    matmul of the un-expanded features, so autograd keeps only the plans.
    """
    num_images, num_reports = patches.shape[0], sentences.shape[0]
    report_block = max(1, min(num_reports, chunk_pairs))
    image_block = max(1, chunk_pairs // report_block)
    solver = _Solver(eps, max_iter, tol)
    rows, stats = [], []
    for a0 in range(0, num_images, image_block):
        a1 = min(num_images, a0 + image_block)
        row_blocks = []
        for b0 in range(0, num_reports, report_block):
            b1 = min(num_reports, b0 + report_block)
            na, nb = a1 - a0, b1 - b0
            cost = _cost(patches[a0:a1], sentences[b0:b1], "akd,bld->abkl")
            k, m = cost.shape[-2:]
            row_mask = patch_mask[a0:a1, None, :].expand(na, nb, k).reshape(na * nb, k)
            col_mask = sentence_mask[None, b0:b1, :].expand(na, nb, m).reshape(na * nb, m)
            distance, stat = solver.distance(cost.reshape(na * nb, k, m), row_mask, col_mask)
            row_blocks.append(distance.view(na, nb))
            stats.append(stat)
        rows.append(torch.cat(row_blocks, dim=1))
    if not rows:
        return patches.new_zeros(num_images, num_reports), OTStats.merge([], patches.device)
    return torch.cat(rows, dim=0), OTStats.merge(stats, patches.device)


def ot_distance_pairs(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    patch_mask: torch.Tensor,
    sentence_mask: torch.Tensor,
    image_index: torch.Tensor,
    report_index: torch.Tensor,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
    chunk_pairs: int = 4096,
) -> tuple[torch.Tensor, OTStats]:
    """OT distances for an explicit list of pairs (image_index[p], report_index[p]); returns (P,)."""
    solver = _Solver(eps, max_iter, tol)
    out, stats = [], []
    for p0 in range(0, image_index.numel(), chunk_pairs):
        img = image_index[p0 : p0 + chunk_pairs]
        rep = report_index[p0 : p0 + chunk_pairs]
        cost = _cost(patches[img], sentences[rep], "pkd,pld->pkl")
        distance, stat = solver.distance(cost, patch_mask[img], sentence_mask[rep])
        out.append(distance)
        stats.append(stat)
    if not out:
        return patches.new_zeros(0), OTStats.merge([], patches.device)
    return torch.cat(out), OTStats.merge(stats, patches.device)


def _hardest(similarity: torch.Tensor, positive: torch.Tensor, candidate_ok: torch.Tensor, k: int) -> torch.Tensor:
    """(n, 1 + k') indices: the positive first, then the k' = min(k, N - 1) most similar other candidates."""
    sim = similarity.detach().float().masked_fill(~candidate_ok[None, :], float("-inf"))
    sim = sim.scatter(1, positive[:, None], float("-inf"))
    k = min(k, similarity.shape[1] - 1)
    negatives = sim.topk(k, dim=1).indices
    return torch.cat([positive[:, None], negatives], dim=1)


def _info_nce_terms(logits: torch.Tensor, target: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
    """Sum over rows with ``row_ok`` of -log softmax(logits)[target]; -inf logits are excluded candidates."""
    # Rows left out get finite dummy logits so neither value nor gradient can be NaN.
    logits = torch.where(row_ok[:, None], logits, torch.zeros_like(logits))
    ce = F.cross_entropy(logits, target, reduction="none")
    return torch.where(row_ok, ce, torch.zeros_like(ce)).sum()


def local_ot_partial(
    patch_local: torch.Tensor,
    patch_all: torch.Tensor,
    sentence_local: torch.Tensor,
    sentence_all: torch.Tensor,
    sentence_mask_local: torch.Tensor,
    sentence_mask_all: torch.Tensor,
    offset: int,
    patch_mask_local: torch.Tensor | None = None,
    patch_mask_all: torch.Tensor | None = None,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
    temperature: float = 0.1,
    chunk_pairs: int = 4096,
    negatives: int | None = None,
    similarity_rows: torch.Tensor | None = None,
    similarity_cols: torch.Tensor | None = None,
) -> tuple[torch.Tensor, OTStats]:
    """Rank-local share of L_local: local image rows and local report columns, divided by 2N.

    ``*_local`` are this rank's n pairs, ``*_all`` the gathered N pairs (local ones at rows
    ``[offset, offset + n)``). With ``negatives=k``, ``similarity_rows`` (n, N) = <v_i, r_j> of
    local images vs all reports and ``similarity_cols`` (n, N) = <r_j, v_i> of local reports vs
    all images rank the negatives. Summing over ranks gives L_local exactly.
    """
    n, total = patch_local.shape[0], patch_all.shape[0]
    device = patch_local.device
    if patch_mask_all is None:
        patch_mask_all = torch.ones(patch_all.shape[:2], dtype=torch.bool, device=device)
    if patch_mask_local is None:
        patch_mask_local = torch.ones(patch_local.shape[:2], dtype=torch.bool, device=device)
    sentence_mask_all = sentence_mask_all.bool()
    sentence_mask_local = sentence_mask_local.bool()
    pair_ok_all = patch_mask_all.bool().any(1) & sentence_mask_all.any(1)
    pair_ok_local = pair_ok_all[offset : offset + n]
    local_index = torch.arange(n, device=device)
    positive = local_index + offset
    solve = {"eps": eps, "max_iter": max_iter, "tol": tol, "chunk_pairs": chunk_pairs}

    if negatives is None:
        d_rows, stats_rows = ot_distance_grid(patch_local, sentence_all, patch_mask_local, sentence_mask_all, **solve)
        d_cols, stats_cols = ot_distance_grid(patch_all, sentence_local, patch_mask_all, sentence_mask_local, **solve)
        logits_rows = ((1 - d_rows) / temperature).masked_fill(~pair_ok_all[None, :], float("-inf"))
        logits_cols = ((1 - d_cols.t()) / temperature).masked_fill(~pair_ok_all[None, :], float("-inf"))
        target = positive
    else:
        if similarity_rows is None or similarity_cols is None:
            raise ValueError("local_ot_partial: negatives=k needs similarity_rows and similarity_cols")
        rows_index = _hardest(similarity_rows, positive, pair_ok_all, negatives)  # reports per local image
        cols_index = _hardest(similarity_cols, positive, pair_ok_all, negatives)  # images per local report
        width = rows_index.shape[1]
        d_rows, stats_rows = ot_distance_pairs(
            patch_local, sentence_all, patch_mask_local, sentence_mask_all,
            local_index.repeat_interleave(width), rows_index.reshape(-1), **solve,
        )  # fmt: skip
        d_cols, stats_cols = ot_distance_pairs(
            patch_all, sentence_local, patch_mask_all, sentence_mask_local,
            cols_index.reshape(-1), local_index.repeat_interleave(width), **solve,
        )  # fmt: skip
        logits_rows = ((1 - d_rows.view(n, width)) / temperature).masked_fill(
            ~pair_ok_all[rows_index], float("-inf")
        )
        logits_cols = ((1 - d_cols.view(n, width)) / temperature).masked_fill(
            ~pair_ok_all[cols_index], float("-inf")
        )
        target = torch.zeros(n, dtype=torch.long, device=device)
    loss = (_info_nce_terms(logits_rows, target, pair_ok_local) + _info_nce_terms(logits_cols, target, pair_ok_local))
    return loss / (2 * total), OTStats.merge([stats_rows, stats_cols], device)


def local_ot_loss(
    patch_features: torch.Tensor,
    sentence_features: torch.Tensor,
    sentence_mask: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
    image_global: torch.Tensor | None = None,
    report_global: torch.Tensor | None = None,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
    temperature: float = 0.1,
    chunk_pairs: int = 4096,
    negatives: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    group: torch.distributed.ProcessGroup | None = None,
) -> LocalOTOutput:
    """L_local for this rank (METHOD.md, Losses 3), scaled so the mean over ranks is the full-batch loss.

    Args:
        patch_features: (n, Kv, d) local visible patch features; ``patch_mask`` (n, Kv) optional.
        sentence_features: (n, S, d) local sentence features; ``sentence_mask`` (n, S) bool.
        image_global, report_global: (n, d) global features; needed only with ``negatives``.
        rank, world_size, group: the distributed setting (all ranks: same n and Kv; S may differ).
    """
    device = patch_features.device
    n = patch_features.shape[0]
    if patch_mask is None:
        patch_mask = torch.ones(patch_features.shape[:2], dtype=torch.bool, device=device)
    # Ranks may pad sentences to different S; align before gathering.
    slots = max_over_ranks(sentence_features.shape[1], world_size, group, device)
    sentence_features = pad_dim_to(sentence_features, slots, dim=1)
    sentence_mask = pad_dim_to(sentence_mask.bool(), slots, dim=1, value=False)

    patch_all = gather_with_grad(patch_features, world_size, group)
    sentence_all = gather_with_grad(sentence_features, world_size, group)
    patch_mask_all = gather_no_grad(patch_mask.bool(), world_size, group)
    sentence_mask_all = gather_no_grad(sentence_mask, world_size, group)
    similarity_rows = similarity_cols = None
    if negatives is not None:
        if image_global is None or report_global is None:
            raise ValueError("local_ot_loss: negatives=k needs image_global and report_global to rank negatives")
        with torch.no_grad():
            similarity_rows = image_global.float() @ gather_no_grad(report_global, world_size, group).float().t()
            similarity_cols = report_global.float() @ gather_no_grad(image_global, world_size, group).float().t()
    partial, stats = local_ot_partial(
        patch_features,
        patch_all,
        sentence_features,
        sentence_all,
        sentence_mask,
        sentence_mask_all,
        offset=rank * n,
        patch_mask_local=patch_mask,
        patch_mask_all=patch_mask_all,
        eps=eps,
        max_iter=max_iter,
        tol=tol,
        temperature=temperature,
        chunk_pairs=chunk_pairs,
        negatives=negatives,
        similarity_rows=similarity_rows,
        similarity_cols=similarity_cols,
    )
    return LocalOTOutput(loss=partial * world_size, stats=stats)
