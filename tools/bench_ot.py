"""Benchmark the OT solver and the local loss at paper shapes (METHOD.md, Losses 3).

Compares ``mlip_dist.losses.ot.sinkhorn_log`` with POT's batch solvers
(``ot.batch.solve_batch`` log_sinkhorn and sinkhorn) and a per-problem
``ot.sinkhorn(method="sinkhorn_log")`` loop (run on a subset and extrapolated),
all at the same number of iterations, and reports the max plan difference.
Then times the full local loss forward + backward at the same shapes.

Part ``dispatch``: one ``local_ot_loss`` call (world size 1, N = ``--dispatch-images``),
forward and backward, with the default tolerance-stopped solver and with
``fixed_iterations`` side by side: aten ops dispatched, host syncs among them
(``aten._local_scalar_dense`` / ``aten.is_nonzero`` / ``aten.item``: each one a
GPU -> CPU wait on an accelerator), pairs solved, wall time. Two feature sets:
random unit vectors (near-uniform plans: the solver stops at its second check) and
"findings" (each image shows two findings on unequal shares of its patches, its sentences
alternate between them: the solver needs several more checks).

    python tools/bench_ot.py                      # paper shapes, 1 thread, both parts
    python tools/bench_ot.py --threads 2 --loop-subset 64
    python tools/bench_ot.py --parts dispatch     # ops / host syncs per OT loss at N = 128
    python tools/bench_ot.py --parts dispatch --compile   # also time ot_compile (fixed iterations)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that copy a tensor value to the host: on an accelerator each one waits for the device.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` runs after one warm-up."""
    result = fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (by ``aten::name``), running each as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.name().split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.ops[name] for name in HOST_SYNC_OPS)


def _load() -> tuple[float, ...]:
    return tuple(round(x, 2) for x in os.getloadavg())


def _ratio(new: float, base: float) -> str:
    return f"{new / base:.2f}x" if base else ("1.00x" if new == base else "inf")


def dispatch_part(args: argparse.Namespace) -> None:
    """Ops and host syncs of one ``local_ot_loss`` (forward, backward) per solver mode, side by side."""
    from mlip_dist.config import LossConfig
    from mlip_dist.losses.local_ot import local_ot_loss

    cfg = LossConfig()
    n, kv, slots, dim = args.dispatch_images, args.patches, args.sentences, args.dim
    g = torch.Generator().manual_seed(args.seed)
    patches = F.normalize(torch.randn(n, kv, dim, generator=g), dim=-1)
    counts = torch.randint(1, slots + 1, (n,), generator=g)
    sentence_mask = torch.arange(slots)[None] < counts[:, None]
    # Findings: image i shows two findings (directions); a third of its patches show the first, the rest the
    # second, and its sentences alternate between them. Moving mass between the two unequal groups across
    # the cost gap is what makes Sinkhorn need several checks (random features converge almost at once).
    findings = F.normalize(torch.randn(n, 2, dim, generator=g), dim=-1)
    image_index = torch.arange(n)[:, None]
    patch_finding = (torch.arange(kv) >= kv // 3).long().expand(n, kv)
    sentence_finding = (torch.arange(slots) % 2).expand(n, slots)
    noise = 0.005
    feature_sets = {
        "random": (patches, F.normalize(torch.randn(n, slots, dim, generator=g), dim=-1)),
        "findings": (
            F.normalize(findings[image_index, patch_finding] + noise * torch.randn(n, kv, dim, generator=g), dim=-1),
            F.normalize(findings[image_index, sentence_finding] + noise * torch.randn(n, slots, dim, generator=g), dim=-1),
        ),
    }
    # Short name -> (description, local_ot_loss options); the first is the baseline of the ratios.
    modes = {
        "default": (f"default (tol {cfg.ot_tol:g})", {}),
        "fixed": (f"fixed ({cfg.ot_max_iter} iterations)", {"fixed_iterations": True}),
    }
    if args.compile:
        modes["compiled"] = ("fixed, compiled", {"fixed_iterations": True, "compiled": True})

    def loss_step(features: tuple[torch.Tensor, torch.Tensor], options: dict, count: bool) -> tuple:
        """(output, forward counter, backward counter, seconds) of one forward + backward."""
        p, s = (f.clone().requires_grad_() for f in features)
        fwd, bwd = DispatchCounter(), DispatchCounter()
        start = time.perf_counter()
        with fwd if count else contextlib.nullcontext():
            out = local_ot_loss(
                p, s, sentence_mask, eps=cfg.ot_epsilon, max_iter=cfg.ot_max_iter, tol=cfg.ot_tol,
                temperature=cfg.local_temperature, chunk_pairs=cfg.ot_chunk_pairs, **options,
            )  # fmt: skip
        with bwd if count else contextlib.nullcontext():
            out.loss.backward()
        return out, fwd, bwd, time.perf_counter() - start

    print(f"\nlocal_ot_loss, world size 1: N = {n} images x {n} reports, {kv} patches x {slots} sentence slots, "
          f"d={dim}, eps {cfg.ot_epsilon}, ot_max_iter {cfg.ot_max_iter}, chunks of {cfg.ot_chunk_pairs} pairs, "
          f"torch threads {args.threads}, torch {torch.__version__}; ops: aten ops dispatched (forward, backward); "
          f"time: best of {args.repeats}; load average before {_load()}")
    print(f"{'features':<8}  {'mode':<26}  {'iterations':>10}  {'pairs':>6}  {'ops fwd':>8}  {'ops bwd':>8}  "
          f"{'host syncs':>10}  {'fwd+bwd':>9}")
    for name, features in feature_sets.items():
        rows = {}
        for short, (mode, options) in modes.items():
            compiled = bool(options.get("compiled"))
            # The first call warms up (and compiles); counted calls are not timed (the counter is slow).
            first = loss_step(features, options, count=False)[3]
            if compiled:
                print(f"{'':<8}  {mode:<26}  first call (compiles): {first:.1f} s")
            else:
                fwd, bwd = loss_step(features, options, count=True)[1:3]
            timed = [loss_step(features, options, count=False) for _ in range(args.repeats)]
            out, seconds = timed[-1][0], min(run[3] for run in timed)
            counts_text = f"{'-':>8}  {'-':>8}  {'-':>10}" if compiled else (
                f"{fwd.total:>8}  {bwd.total:>8}  {fwd.host_syncs + bwd.host_syncs:>10}")
            print(f"{name:<8}  {mode:<26}  {out.stats.iterations:>10}  {out.stats.pairs:>6}  {counts_text}  "
                  f"{seconds:>7.2f} s  loss {float(out.loss.detach()):.6f}")
            rows[short] = (None, None, seconds) if compiled else (fwd, bwd, seconds)
        (b_fwd, b_bwd, b_time), *others = rows.values()
        for short, (o_fwd, o_bwd, o_time) in zip(list(rows)[1:], others, strict=True):
            if o_fwd is None:
                counts_text = f"{'-':>8}  {'-':>8}  {'-':>10}"
            else:
                syncs = f"{o_fwd.host_syncs + o_bwd.host_syncs} / {b_fwd.host_syncs + b_bwd.host_syncs}"
                counts_text = f"{_ratio(o_fwd.total, b_fwd.total):>8}  {_ratio(o_bwd.total, b_bwd.total):>8}  {syncs:>10}"
            print(f"{'':<8}  {f'ratio {short} / default':<26}  {'':>10}  {'':>6}  {counts_text}  {_ratio(o_time, b_time):>9}")
    print(f"load average after {_load()}")


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
    parser.add_argument("--parts", nargs="+", choices=("solvers", "dispatch"), default=["solvers", "dispatch"])
    parser.add_argument("--dispatch-images", type=int, default=128, help="N of the dispatch part (world size 1)")
    parser.add_argument("--compile", action="store_true", help="dispatch part: also time the compiled solver")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "solvers" in args.parts:
        solvers_part(args)
    if "dispatch" in args.parts:
        dispatch_part(args)


def solvers_part(args: argparse.Namespace) -> None:
    """sinkhorn_log against POT's solvers at the same iterations, then one rank's local loss."""

    import ot
    import ot.batch

    from mlip_dist.losses.local_ot import local_ot_loss
    from mlip_dist.losses.ot import sinkhorn_log

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

    # One rank's share from gathered features (local_ot_partial): rows n x N and the columns of the other
    # ranks' images (N - n) x n, the local n x n block solved once for both; forward + backward.
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
    print(f"local loss fwd+bwd (one rank: {local_stats.pairs} pairs, tol 1e-4, chunks of 4096): {t_local * 1e3:9.1f} ms  "
          f"loss {float(local_value):.4f}  OT iterations {local_stats.iterations}  "
          f"marginal error {float(local_stats.marginal_error):.2e}")
    # Single-process API used by the composite loss, same shapes with N = n (sanity: runs, finite).
    check = local_ot_loss(patches, sentences[:n], sentence_mask[:n], eps=eps)
    assert torch.isfinite(check.loss), "local loss is not finite"
    assert bool(torch.isfinite(plan).all()), "our plan has non-finite entries"


if __name__ == "__main__":
    main()
