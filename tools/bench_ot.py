"""Benchmark the OT solver and the local loss at paper shapes (METHOD.md, Losses 3).

Compares ``mlip_dist.losses.ot.sinkhorn_log`` with POT's batch solvers
(``ot.batch.solve_batch`` log_sinkhorn and sinkhorn) and a per-problem
``ot.sinkhorn(method="sinkhorn_log")`` loop (run on a subset and extrapolated),
all at the same number of iterations, and reports the max plan difference.
Then times the full local loss forward + backward at the same shapes.

    python tools/bench_ot.py                      # paper shapes, 1 thread
    python tools/bench_ot.py --threads 2 --loop-subset 64
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs after one warm-up."""
    result = fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-images", type=int, default=32)
    parser.add_argument("--reports", type=int, default=256, help="gathered reports (global batch)")
    parser.add_argument("--patches", type=int, default=98, help="visible patches (224 px, 16 px patches, 50%% mask)")
    parser.add_argument("--sentences", type=int, default=16, help="sentence slots; counts are random in 1..S")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--loop-subset", type=int, default=64, help="problems solved by the ot.sinkhorn loop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ot
    import ot.batch

    from mlip_dist.losses.local_ot import local_ot_loss
    from mlip_dist.losses.ot import sinkhorn_log

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    n, total, kv, slots, dim = args.local_images, args.reports, args.patches, args.sentences, args.dim
    pairs = n * total
    patches = F.normalize(torch.randn(n, kv, dim, generator=g), dim=-1)
    sentences = F.normalize(torch.randn(total, slots, dim, generator=g), dim=-1)
    counts = torch.randint(1, slots + 1, (total,), generator=g)
    sentence_mask = torch.arange(slots)[None] < counts[:, None]
    cost = (1 - torch.einsum("akd,bld->abkl", patches, sentences)).reshape(pairs, kv, slots)
    col_mask = sentence_mask[None].expand(n, total, slots).reshape(pairs, slots)
    row_mask = torch.ones(pairs, kv, dtype=torch.bool)
    a = torch.full((pairs, kv), 1 / kv)
    b = col_mask.float() / col_mask.sum(1, keepdim=True)
    iters, eps = args.iterations, args.eps
    print(
        f"shapes: {n} local images x {total} gathered reports = {pairs} problems of {kv} x {slots} "
        f"(sentences per report 1..{slots}, mean {counts.float().mean():.1f}), d={dim}, eps={eps}, "
        f"{iters} iterations, float32, torch threads={args.threads}, torch {torch.__version__}, POT {ot.__version__}"
    )

    t_ours, ours = _time(lambda: sinkhorn_log(cost, row_mask, col_mask, eps, iters, tol=0.0), args.repeats)
    plan = ours.plan
    print(f"ours sinkhorn_log           : {t_ours * 1e3:9.1f} ms  (iterations {ours.iterations}, "
          f"marginal error {float(ours.marginal_error):.2e}, finite {bool(torch.isfinite(plan).all())})")

    t_log, pot_log = _time(
        lambda: ot.batch.solve_batch(cost, eps, a=a, b=b, max_iter=iters, tol=0.0, method="log_sinkhorn").plan,
        args.repeats,
    )
    print(f"POT solve_batch log_sinkhorn: {t_log * 1e3:9.1f} ms  ratio POT/ours {t_log / t_ours:5.2f}x  "
          f"max |plan diff| {float((pot_log - plan).abs().max()):.2e}")
    t_plain, pot_plain = _time(
        lambda: ot.batch.solve_batch(cost, eps, a=a, b=b, max_iter=iters, tol=0.0, method="sinkhorn").plan,
        args.repeats,
    )
    plain_diff = (pot_plain - plan).abs().max()
    print(f"POT solve_batch sinkhorn    : {t_plain * 1e3:9.1f} ms  ratio POT/ours {t_plain / t_ours:5.2f}x  "
          f"max |plan diff| {float(plain_diff):.2e}  (finite {bool(torch.isfinite(pot_plain).all())})")

    subset = min(args.loop_subset, pairs)

    def loop() -> list[torch.Tensor]:
        out = []
        for p in range(subset):
            m = int(counts[p % total])
            out.append(
                ot.sinkhorn(a[p], b[p, :m], cost[p, :, :m], eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
            )
        return out

    t_loop_subset, loop_plans = _time(loop, 1)
    t_loop = t_loop_subset * pairs / subset
    loop_diff = max(float((lp - plan[p, :, : lp.shape[1]]).abs().max()) for p, lp in enumerate(loop_plans))
    print(f"POT ot.sinkhorn loop        : {t_loop * 1e3:9.1f} ms  ratio POT/ours {t_loop / t_ours:5.2f}x  "
          f"max |plan diff| {loop_diff:.2e}  (measured on {subset} problems, extrapolated x{pairs / subset:.0f})")

    # The full local loss of one rank: its rows (n x N) and columns (N x n), forward + backward.
    images_all = F.normalize(torch.randn(total, kv, dim, generator=g), dim=-1)
    images_all[:n] = patches

    def local_step() -> tuple[torch.Tensor, object]:
        p_all = images_all.clone().requires_grad_()
        s_all = sentences.clone().requires_grad_()
        from mlip_dist.losses.local_ot import local_ot_partial

        loss, stats = local_ot_partial(
            p_all[:n], p_all, s_all[:n], s_all, sentence_mask[:n], sentence_mask, offset=0,
            eps=eps, max_iter=iters, tol=1e-4, temperature=0.1, chunk_pairs=4096,
        )  # fmt: skip
        loss.backward()
        return loss.detach(), stats

    t_local, (local_value, local_stats) = _time(local_step, 1)
    print(f"local loss fwd+bwd (one rank: {2 * pairs} pairs, tol 1e-4, chunks of 4096): {t_local * 1e3:9.1f} ms  "
          f"loss {float(local_value):.4f}  OT iterations {local_stats.iterations}  "
          f"marginal error {float(local_stats.marginal_error):.2e}")
    # Single-process API used by the composite loss, same shapes with N = n (sanity: runs, finite).
    check = local_ot_loss(patches, sentences[:n], sentence_mask[:n], eps=eps)
    assert torch.isfinite(check.loss), "local loss is not finite"
    assert bool(torch.isfinite(plan).all()), "our plan has non-finite entries"


if __name__ == "__main__":
    main()
