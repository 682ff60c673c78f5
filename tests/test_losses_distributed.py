"""Real 2-process check of the distributed loss convention (docs/ARCHITECTURE.md, Distributed losses).

Two gloo ranks each hold half of a batch and call the world-size-aware ``MLIPLoss``.
The mean of their losses must equal the single-process loss on the whole batch, and
the gradients reaching each rank's local features (after the gather's backward sums
them over ranks) must equal world_size times the single-process gradient, so that
DeepSpeed's gradient averaging reproduces single-process training.

The local OT loss solves every (image, report) pair once (issue 17): it is checked against a
verbatim copy of the earlier two-grid algorithm (rows and columns solved separately) in one
process, over simulated ranks, and on two gloo ranks, with the pairs each one solves.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import load_tool

from mlip_dist.config import IntegrityMode, LossConfig
from mlip_dist.distributed import gather_no_grad, gather_with_grad, max_over_ranks, pad_dim_to
from mlip_dist.losses.composite import MLIPLoss
from mlip_dist.losses.local_ot import local_ot_loss, local_ot_partial, ot_distance_grid, ot_distance_pairs
from mlip_dist.models.output import MLIPOutput

WORLD = 2
LOCAL = 3
FEATURES = ("image_global", "report_global", "patch_features", "sentence_features", "reconstruction")
CONFIGS = {
    "relative": LossConfig(ot_tol=0.0, ot_chunk_pairs=5),
    "learned_negatives": LossConfig(ot_tol=0.0, integrity=IntegrityMode.LEARNED, local_negatives=2),
}
NUM_PATCHES = 10


def _full_output(seed: int = 0) -> MLIPOutput:
    """The whole batch, identical in every process (seeded)."""
    n, kv, s, d, km, pix = WORLD * LOCAL, 5, 4, 8, 5, 12
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    counts = torch.randint(1, s + 1, (n,), generator=g)
    visibility = torch.zeros(n, NUM_PATCHES, dtype=torch.bool)
    for i in range(n):
        visibility[i, torch.randperm(NUM_PATCHES, generator=g)[:kv]] = True
    return MLIPOutput(
        image_global=unit(n, d),
        report_global=unit(n, d),
        patch_features=unit(n, kv, d),
        visible_patch_idx=torch.zeros(n, kv, dtype=torch.long),
        sentence_features=unit(n, s, d),
        sentence_mask=torch.arange(s)[None] < counts[:, None],
        visibility_mask=visibility,
        logit_scale=torch.tensor(1 / 0.07),
        image_global_full=unit(n, d),
        reconstruction=torch.randn(n, km, pix, generator=g),
        masked_patch_idx=torch.zeros(n, km, dtype=torch.long),
        reconstruction_target=torch.randn(n, km, pix, generator=g),
    )


def _slice(output: MLIPOutput, lo: int, hi: int) -> MLIPOutput:
    fields = {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in vars(output).items()}
    for name in FEATURES:
        fields[name] = fields[name].clone().requires_grad_()
    return MLIPOutput(**fields)


def _build_loss(config: LossConfig) -> MLIPLoss:
    loss_fn = MLIPLoss(config, num_patches=NUM_PATCHES)
    if loss_fn.learned_integrity is not None:
        # Away from the w = 1 initialisation, where the bias gradient is exactly zero.
        with torch.no_grad():
            loss_fn.learned_integrity.weight.normal_(generator=torch.Generator().manual_seed(1))
    return loss_fn


def _run(loss_fn: MLIPLoss, output: MLIPOutput, rank: int, world: int) -> dict[str, torch.Tensor]:
    result = loss_fn(output, rank=rank, world_size=world, group=None)
    result.total.backward()
    out = {"total": result.total.detach()}
    out.update({name: getattr(output, name).grad for name in FEATURES})
    out.update({f"param.{k}": p.grad for k, p in loss_fn.named_parameters()})
    return out


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, config in CONFIGS.items():
            local = _slice(_full_output(), rank * LOCAL, (rank + 1) * LOCAL)
            if rank == 0:
                # Ranks pad sentences to different slot counts: the loss must align them.
                local.sentence_features = F.pad(local.sentence_features.detach(), (0, 0, 0, 2)).requires_grad_()
                local.sentence_mask = F.pad(local.sentence_mask, (0, 2), value=False)
            results[name] = _run(_build_loss(config), local, rank, WORLD)
        tmp = Path(folder) / f"rank{rank}.pt.tmp"
        torch.save(results, tmp)
        tmp.rename(Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


@pytest.mark.slow
def test_two_gloo_ranks_reproduce_single_process_loss_and_gradients(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, config in CONFIGS.items():
        full = _run(_build_loss(config), _slice(_full_output(), 0, WORLD * LOCAL), 0, 1)
        mean_loss = sum(r[name]["total"] for r in ranks) / WORLD
        assert _rel(mean_loss, full["total"]) <= 1e-5, name
        for feature in FEATURES:
            for rank, result in enumerate(ranks):
                got = result[name][feature] / WORLD  # DeepSpeed's averaging divides by the world size
                if feature == "sentence_features" and rank == 0:
                    assert torch.count_nonzero(got[:, -2:]) == 0  # padded slots get no gradient
                    got = got[:, :-2]
                want = full[feature][rank * LOCAL : (rank + 1) * LOCAL]
                assert _rel(got, want) <= 1e-5, (name, feature, rank)
        for key in (k for k in full if k.startswith("param.")):
            averaged = sum(r[name][key] for r in ranks) / WORLD
            assert _rel(averaged, full[key]) <= 1e-5, (name, key)


# ---------------------------------------------------------------- every OT pair solved once (issue 17)


def _reference_hardest(similarity, positive, candidate_ok, k):
    sim = similarity.detach().float().masked_fill(~candidate_ok[None, :], float("-inf"))
    sim = sim.scatter(1, positive[:, None], float("-inf"))
    negatives = sim.topk(min(k, similarity.shape[1] - 1), dim=1).indices
    return torch.cat([positive[:, None], negatives], dim=1)


def _reference_info_nce_terms(logits, target, row_ok):
    logits = torch.where(row_ok[:, None], logits, torch.zeros_like(logits))
    ce = F.cross_entropy(logits, target, reduction="none")
    return torch.where(row_ok, ce, torch.zeros_like(ce)).sum()


def _reference_partial(
    patch_local, patch_all, sentence_local, sentence_all, sentence_mask_local, sentence_mask_all, offset,
    patch_mask_local, patch_mask_all, temperature, negatives, similarity_rows, similarity_cols, **solve,
):
    """The local loss before issue 17, verbatim: the row grid (local images x all reports) and the column
    grid (all images x local reports) solved separately, so the local block is solved twice."""
    n, total = patch_local.shape[0], patch_all.shape[0]
    pair_ok_all = patch_mask_all.bool().any(1) & sentence_mask_all.any(1)
    pair_ok_local = pair_ok_all[offset : offset + n]
    local_index = torch.arange(n)
    positive = local_index + offset
    if negatives is None:
        d_rows, stats_rows = ot_distance_grid(patch_local, sentence_all, patch_mask_local, sentence_mask_all, **solve)
        d_cols, stats_cols = ot_distance_grid(patch_all, sentence_local, patch_mask_all, sentence_mask_local, **solve)
        logits_rows = ((1 - d_rows) / temperature).masked_fill(~pair_ok_all[None, :], float("-inf"))
        logits_cols = ((1 - d_cols.t()) / temperature).masked_fill(~pair_ok_all[None, :], float("-inf"))
        target = positive
    else:
        rows_index = _reference_hardest(similarity_rows, positive, pair_ok_all, negatives)
        cols_index = _reference_hardest(similarity_cols, positive, pair_ok_all, negatives)
        width = rows_index.shape[1]
        d_rows, stats_rows = ot_distance_pairs(
            patch_local, sentence_all, patch_mask_local, sentence_mask_all,
            local_index.repeat_interleave(width), rows_index.reshape(-1), **solve,
        )  # fmt: skip
        d_cols, stats_cols = ot_distance_pairs(
            patch_all, sentence_local, patch_mask_all, sentence_mask_local,
            cols_index.reshape(-1), local_index.repeat_interleave(width), **solve,
        )  # fmt: skip
        logits_rows = ((1 - d_rows.view(n, width)) / temperature).masked_fill(~pair_ok_all[rows_index], float("-inf"))
        logits_cols = ((1 - d_cols.view(n, width)) / temperature).masked_fill(~pair_ok_all[cols_index], float("-inf"))
        target = torch.zeros(n, dtype=torch.long)
    loss = _reference_info_nce_terms(logits_rows, target, pair_ok_local)
    loss = loss + _reference_info_nce_terms(logits_cols, target, pair_ok_local)
    return loss / (2 * total), stats_rows.pairs + stats_cols.pairs


def _reference_local_loss(patches, sentences, sentence_mask, patch_mask, image_global, report_global, negatives,
                          rank, world, **solve):
    """local_ot_loss before issue 17: patches and sentences gathered with gradient, then the two grids."""
    n = patches.shape[0]
    slots = max_over_ranks(sentences.shape[1], world, None, patches.device)
    sentences = pad_dim_to(sentences, slots, dim=1)
    sentence_mask = pad_dim_to(sentence_mask.bool(), slots, dim=1, value=False)
    patch_all = gather_with_grad(patches, world)
    sentence_all = gather_with_grad(sentences, world)
    patch_mask_all = gather_no_grad(patch_mask, world)
    sentence_mask_all = gather_no_grad(sentence_mask, world)
    sim_rows = sim_cols = None
    if negatives is not None:
        sim_rows = image_global.float() @ gather_no_grad(report_global, world).float().t()
        sim_cols = report_global.float() @ gather_no_grad(image_global, world).float().t()
    partial, pairs = _reference_partial(
        patches, patch_all, sentences, sentence_all, sentence_mask, sentence_mask_all, rank * n, patch_mask,
        patch_mask_all, OT_SOLVE["temperature"], negatives, sim_rows, sim_cols, **solve,
    )
    return partial * world, pairs


OT_SOLVE = {"eps": 0.1, "max_iter": 30, "tol": 0.0, "chunk_pairs": 5, "temperature": 0.1}
OT_NEGATIVES = (None, 2)


def _ot_inputs(world: int, n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """float64 features of the whole batch: masked patches, ragged sentences, one empty report."""
    total, kv, s, d = world * n, 5, 4, 8
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    counts = torch.randint(1, s + 1, (total,), generator=g)
    counts[-1] = 0  # a report without a sentence: neither a positive nor a negative
    patch_mask = torch.rand(total, kv, generator=g) > 0.3
    patch_mask[:, 0] = True
    return {
        "patches": unit(total, kv, d), "sentences": unit(total, s, d),
        "sentence_mask": torch.arange(s)[None] < counts[:, None], "patch_mask": patch_mask,
        "image_global": unit(total, d), "report_global": unit(total, d),
    }  # fmt: skip


def _ot_rank_results(inputs: dict[str, torch.Tensor], rank: int, world: int, pad_slots: int = 0) -> dict:
    """This rank's loss, gradients and pairs solved, from local_ot_loss and from the reference, per negatives."""
    n = inputs["patches"].shape[0] // world
    local = {k: v[rank * n : (rank + 1) * n] for k, v in inputs.items()}
    solve = {k: v for k, v in OT_SOLVE.items() if k != "temperature"}
    out = {}
    for negatives in OT_NEGATIVES:
        for name in ("new", "reference"):
            p = local["patches"].clone().requires_grad_()
            s = F.pad(local["sentences"], (0, 0, 0, pad_slots)).requires_grad_()
            mask = F.pad(local["sentence_mask"], (0, pad_slots), value=False)
            common = (local["patch_mask"], local["image_global"], local["report_global"])
            if name == "new":
                result = local_ot_loss(
                    p, s, mask, *common, negatives=negatives, rank=rank, world_size=world, **OT_SOLVE
                )
                loss, pairs = result.loss, result.stats.pairs
            else:
                loss, pairs = _reference_local_loss(p, s, mask, *common, negatives, rank, world, **solve)
            loss.backward()
            out[(negatives, name)] = {"loss": loss.detach(), "patches": p.grad, "sentences": s.grad, "pairs": pairs}
    return out


def _assert_matches_reference(results: dict, n: int, world: int) -> None:
    total = world * n
    for negatives in OT_NEGATIVES:
        new, ref = results[(negatives, "new")], results[(negatives, "reference")]
        assert _rel(new["loss"], ref["loss"]) <= 1e-12, negatives
        for key in ("patches", "sentences"):
            assert _rel(new[key], ref[key]) <= 1e-10, (negatives, key)
        if negatives is None:
            assert ref["pairs"] == 2 * n * total  # before: the local n x n block solved in both grids
            assert new["pairs"] == n * total  # now: the rank's rows only; N * N over the world
        else:
            width = min(negatives, total - 1) + 1
            assert ref["pairs"] == 2 * n * width
            assert new["pairs"] == 2 * n * width - n  # the n positives solved once


def test_local_loss_solves_each_pair_once_and_matches_the_two_grid_reference():
    """World size 1: N * N pairs instead of 2 N * N, same loss and gradients as the reference."""
    n = 6
    _assert_matches_reference(_ot_rank_results(_ot_inputs(1, n), rank=0, world=1), n, world=1)


def test_local_partial_reuses_the_local_block():
    """Simulated ranks (no collective): each share solves 2 n N - n^2 pairs and equals the reference share."""
    world, n = 3, 2
    inputs = _ot_inputs(world, n, seed=4)
    total = world * n
    solve = {k: v for k, v in OT_SOLVE.items() if k != "temperature"}
    p = inputs["patches"].clone().requires_grad_()
    s = inputs["sentences"].clone().requires_grad_()
    masks = (inputs["sentence_mask"], inputs["patch_mask"])
    news, refs = [], []
    for rank in range(world):
        lo, hi = rank * n, (rank + 1) * n
        new, stats = local_ot_partial(
            p[lo:hi], p, s[lo:hi], s, masks[0][lo:hi], masks[0], offset=lo, patch_mask_local=masks[1][lo:hi],
            patch_mask_all=masks[1], **OT_SOLVE,
        )  # fmt: skip
        ref, ref_pairs = _reference_partial(
            p[lo:hi], p, s[lo:hi], s, masks[0][lo:hi], masks[0], lo, masks[1][lo:hi], masks[1],
            OT_SOLVE["temperature"], None, None, None, **solve,
        )  # fmt: skip
        assert stats.pairs == 2 * n * total - n * n and ref_pairs == 2 * n * total
        assert _rel(new.detach(), ref.detach()) <= 1e-12
        for got, want in zip(torch.autograd.grad(new, (p, s)), torch.autograd.grad(ref, (p, s)), strict=True):
            assert _rel(got, want) <= 1e-10
        news.append(new.detach())
        refs.append(ref.detach())
    assert _rel(sum(news), sum(refs)) <= 1e-12


def _ot_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Rank 0 pads its sentences to more slots: the loss aligns them.
        results = _ot_rank_results(_ot_inputs(WORLD, LOCAL), rank, WORLD, pad_slots=2 if rank == 0 else 0)
        local = {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in _ot_inputs(WORLD, LOCAL).items()}
        with load_tool("bench_ot").DispatchCounter() as ops:
            local_ot_loss(local["patches"], local["sentences"], local["sentence_mask"], rank=rank, world_size=WORLD,
                          fixed_iterations=True, tol=1e-4)  # fmt: skip
        results["fixed_iterations_syncs"] = ops.host_syncs
        tmp = Path(folder) / f"ot_rank{rank}.pt.tmp"
        torch.save(results, tmp)
        tmp.rename(Path(folder) / f"ot_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_solve_each_pair_once_and_match_the_two_grid_reference(tmp_path):
    """World size 2: n * N pairs per rank (N * N over the world, not 2 N * N); every rank's loss and
    gradients equal the reference's; with fixed iterations the one host sync is the slot-count agreement."""
    mp.spawn(_ot_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"ot_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for results in ranks:
        _assert_matches_reference(results, LOCAL, WORLD)
        assert results["fixed_iterations_syncs"] == 1  # max_over_ranks: one integer, before any gather
    total = WORLD * LOCAL
    assert sum(r[(None, "new")]["pairs"] for r in ranks) == total * total
    assert sum(r[(None, "reference")]["pairs"] for r in ranks) == 2 * total * total
