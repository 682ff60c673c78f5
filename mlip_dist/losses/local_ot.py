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

Sharding: rank r needs sigma for (its local images) x (all reports), its rows,
and for (all images) x (its local reports), its columns; no rank ever holds the
N x N x K x M cost tensor, and pairs are solved in chunks of at most ``chunk_pairs``.
Every OT problem is solved once (``OTStats.pairs`` counts them):

* all negatives (:func:`local_ot_loss`): rank r solves only its rows, n x N pairs,
  and the (n, N) distances of all ranks are gathered with gradient into the (N, N)
  matrix whose columns ``[rn, (r + 1)n)`` are its columns. N * N pairs per world
  at any world size (n * N per rank; N * N, not 2 N * N, in one process);
* :func:`local_ot_partial` (one rank's share from gathered features, no collective):
  rows n x N plus the columns of the other ranks' images (N - n) x n; the local
  block n x n is solved once and used in both directions: 2 n N - n^2 pairs;
* ``negatives=k``: per row/column the positive plus the k hardest negatives by
  global similarity; the n positives are solved once, for both directions:
  n (k' + 1) + n k' pairs per rank, k' = min(k, N - 1).

Where a distance is reused its gradient takes the other path to the same features
(the local copy instead of the gathered one, or the gathered distance instead of a
second solve); the gathers' backward sums over ranks, so every rank's gradient is
unchanged.

Pairs whose image has no valid patch or whose report has no valid sentence are
left out: they are not a positive and not a negative (an empty report would
otherwise have d = 0, the best possible similarity). The normaliser stays 2N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

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


class _SolveOptions(TypedDict):
    """The solver keywords that :func:`local_ot_partial` and :func:`local_ot_loss` pass on."""

    eps: float
    max_iter: int
    tol: float
    chunk_pairs: int
    fixed_iterations: bool
    compiled: bool


@dataclass
class _Solver:
    eps: float
    max_iter: int
    tol: float
    fixed_iterations: bool = False
    compiled: bool = False

    def distance(
        self, cost: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor
    ) -> tuple[torch.Tensor, OTStats]:
        """d = <T*, C> per problem of a (P, K, M) cost; T* from a no-grad solve."""
        result = sinkhorn_log(
            cost.detach(), row_mask, col_mask, self.eps, self.max_iter, self.tol,
            fixed_iterations=self.fixed_iterations, compiled=self.compiled,
        )  # fmt: skip
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
    fixed_iterations: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, OTStats]:
    """OT distances d_ij = <T*_ij, C_ij> (METHOD.md, Losses 3) for every image i in ``patches`` (A, K, d)
    and report j in ``sentences`` (R, S, d).

    Returns (A, R) distances (differentiable w.r.t. both feature tensors) and solver stats; each
    of the A * R pairs is solved exactly once. At most ``chunk_pairs`` (i, j) pairs are solved
    at once; cost blocks come from one matmul of the un-expanded features, so autograd keeps
    only the plans. ``fixed_iterations`` and ``compiled``: see :func:`sinkhorn_log`.
    """
    num_images, num_reports = patches.shape[0], sentences.shape[0]
    report_block = max(1, min(num_reports, chunk_pairs))
    image_block = max(1, chunk_pairs // report_block)
    solver = _Solver(eps, max_iter, tol, fixed_iterations, compiled)
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
    fixed_iterations: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, OTStats]:
    """OT distances (METHOD.md, Losses 3) for an explicit list of pairs (image_index[p], report_index[p]).

    Returns (P,) distances, each listed pair solved once (a pair listed twice is solved twice).
    """
    solver = _Solver(eps, max_iter, tol, fixed_iterations, compiled)
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


def _info_nce_partial(
    d_rows: torch.Tensor,
    d_cols: torch.Tensor,
    row_candidates_ok: torch.Tensor,
    col_candidates_ok: torch.Tensor,
    target: torch.Tensor,
    pair_ok_local: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Sum of the rank's row and column InfoNCE terms over sigma / tau = (1 - d) / tau (METHOD.md, Losses 3).

    ``d_rows[i, c]``: local image i vs its c-th candidate report; ``d_cols[j, c]``: local report j vs
    its c-th candidate image; candidates that are not ok are excluded, ``target`` is the positive.
    """
    logits_rows = ((1 - d_rows) / temperature).masked_fill(~row_candidates_ok, float("-inf"))
    logits_cols = ((1 - d_cols) / temperature).masked_fill(~col_candidates_ok, float("-inf"))
    return _info_nce_terms(logits_rows, target, pair_ok_local) + _info_nce_terms(logits_cols, target, pair_ok_local)


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
    fixed_iterations: bool = False,
    compiled: bool = False,
) -> tuple[torch.Tensor, OTStats]:
    """Rank-local share of L_local (METHOD.md, Losses 3): local image rows and local report columns, over 2N.

    ``*_local`` are this rank's n pairs, ``*_all`` the gathered N pairs (local ones at rows
    ``[offset, offset + n)``). With ``negatives=k``, ``similarity_rows`` (n, N) = <v_i, r_j> of
    local images vs all reports and ``similarity_cols`` (n, N) = <r_j, v_i> of local reports vs
    all images rank the negatives. Summing over ranks gives L_local exactly.

    No pair is solved twice: all negatives, 2 n N - n^2 pairs (the local n x n block serves rows
    and columns; N^2 when n = N); ``negatives=k``, n (k' + 1) + n k' with k' = min(k, N - 1)
    (the positives serve both directions).
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
    solve = _SolveOptions(
        eps=eps, max_iter=max_iter, tol=tol, chunk_pairs=chunk_pairs, fixed_iterations=fixed_iterations,
        compiled=compiled,
    )  # fmt: skip

    if negatives is None:
        d_rows, stats_rows = ot_distance_grid(patch_local, sentence_all, patch_mask_local, sentence_mask_all, **solve)
        # Columns: the local images' block is d_rows[:, local] (solved above); only the other images are solved.
        end = offset + n
        d_above, stats_above = ot_distance_grid(
            patch_all[:offset], sentence_local, patch_mask_all[:offset], sentence_mask_local, **solve
        )
        d_below, stats_below = ot_distance_grid(
            patch_all[end:], sentence_local, patch_mask_all[end:], sentence_mask_local, **solve
        )
        d_cols = torch.cat([d_above, d_rows[:, offset:end], d_below], dim=0).t()
        candidates_ok = pair_ok_all[None, :].expand(n, total)
        loss = _info_nce_partial(d_rows, d_cols, candidates_ok, candidates_ok, positive, pair_ok_local, temperature)
        return loss / (2 * total), OTStats.merge([stats_rows, stats_above, stats_below], device)

    if similarity_rows is None or similarity_cols is None:
        raise ValueError("local_ot_partial: negatives=k needs similarity_rows and similarity_cols")
    rows_index = _hardest(similarity_rows, positive, pair_ok_all, negatives)  # reports per local image
    cols_index = _hardest(similarity_cols, positive, pair_ok_all, negatives)  # images per local report
    width = rows_index.shape[1]
    d_rows, stats_rows = ot_distance_pairs(
        patch_local, sentence_all, patch_mask_local, sentence_mask_all,
        local_index.repeat_interleave(width), rows_index.reshape(-1), **solve,
    )  # fmt: skip
    d_rows = d_rows.view(n, width)
    # Column j's positive (image offset + j, local report j) is row j's positive: reuse it, solve the negatives.
    d_cols_negative, stats_cols = ot_distance_pairs(
        patch_all, sentence_local, patch_mask_all, sentence_mask_local,
        cols_index[:, 1:].reshape(-1), local_index.repeat_interleave(width - 1), **solve,
    )  # fmt: skip
    d_cols = torch.cat([d_rows[:, :1], d_cols_negative.view(n, width - 1)], dim=1)
    target = torch.zeros(n, dtype=torch.long, device=device)
    loss = _info_nce_partial(
        d_rows, d_cols, pair_ok_all[rows_index], pair_ok_all[cols_index], target, pair_ok_local, temperature
    )
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
    fixed_iterations: bool = False,
    compiled: bool = False,
) -> LocalOTOutput:
    """L_local for this rank (METHOD.md, Losses 3), scaled so the mean over ranks is the full-batch loss.

    Args:
        patch_features: (n, Kv, d) local visible patch features; ``patch_mask`` (n, Kv) optional.
        sentence_features: (n, S, d) local sentence features; ``sentence_mask`` (n, S) bool.
        image_global, report_global: (n, d) global features; needed only with ``negatives``.
        rank, world_size, group: the distributed setting (all ranks: same n and Kv; S may differ).
        fixed_iterations: exactly ``max_iter`` Sinkhorn iterations, no host sync in the solver.
        compiled: the solver's steps through ``torch.compile`` (see :func:`sinkhorn_log`).

    Pairs solved per rank (``stats.pairs``): all negatives, n * N (every pair once per world);
    ``negatives=k``, n (k' + 1) + n k' with k' = min(k, N - 1). With ``world_size > 1`` the only
    host sync outside the solver is the agreement on the sentence slot count (one integer).
    """
    device = patch_features.device
    n = patch_features.shape[0]
    if patch_mask is None:
        patch_mask = torch.ones(patch_features.shape[:2], dtype=torch.bool, device=device)
    # Ranks may pad sentences to different S; align before gathering.
    slots = max_over_ranks(sentence_features.shape[1], world_size, group, device)
    sentence_features = pad_dim_to(sentence_features, slots, dim=1)
    sentence_mask = pad_dim_to(sentence_mask.bool(), slots, dim=1, value=False)

    sentence_all = gather_with_grad(sentence_features, world_size, group)
    patch_mask_all = gather_no_grad(patch_mask.bool(), world_size, group)
    sentence_mask_all = gather_no_grad(sentence_mask, world_size, group)
    solve = _SolveOptions(
        eps=eps, max_iter=max_iter, tol=tol, chunk_pairs=chunk_pairs, fixed_iterations=fixed_iterations,
        compiled=compiled,
    )  # fmt: skip
    offset, total = rank * n, world_size * n
    if negatives is None:
        # Only this rank's rows are solved; its columns are the other ranks' rows, gathered with
        # gradient (their backward returns each column's gradient to the rank that solved it).
        d_rows, stats = ot_distance_grid(patch_features, sentence_all, patch_mask, sentence_mask_all, **solve)
        d_all = gather_with_grad(d_rows, world_size, group)
        pair_ok_all = patch_mask_all.any(1) & sentence_mask_all.any(1)
        candidates_ok = pair_ok_all[None, :].expand(n, total)
        positive = torch.arange(offset, offset + n, device=device)
        partial = _info_nce_partial(
            d_rows, d_all[:, offset : offset + n].t(), candidates_ok, candidates_ok, positive,
            pair_ok_all[offset : offset + n], temperature,
        ) / (2 * total)  # fmt: skip
        return LocalOTOutput(loss=partial * world_size, stats=stats)

    if image_global is None or report_global is None:
        raise ValueError("local_ot_loss: negatives=k needs image_global and report_global to rank negatives")
    patch_all = gather_with_grad(patch_features, world_size, group)
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
        offset=offset,
        patch_mask_local=patch_mask,
        patch_mask_all=patch_mask_all,
        temperature=temperature,
        negatives=negatives,
        similarity_rows=similarity_rows,
        similarity_cols=similarity_cols,
        **solve,
    )
    return LocalOTOutput(loss=partial * world_size, stats=stats)
