"""Real 2-process check of the distributed loss convention (docs/ARCHITECTURE.md, Distributed losses).

Two gloo ranks each hold half of a batch and call the world-size-aware ``MLIPLoss``.
The mean of their losses must equal the single-process loss on the whole batch, and
the gradients reaching each rank's local features (after the gather's backward sums
them over ranks) must equal world_size times the single-process gradient, so that
DeepSpeed's gradient averaging reproduces single-process training.
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

from mlip_dist.config import IntegrityMode, LossConfig
from mlip_dist.losses.composite import MLIPLoss
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
