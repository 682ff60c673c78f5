"""Batched entropic optimal transport with padding masks (METHOD.md, Losses 3).

One solver for the whole project: the local loss, zero-shot local scores and
grounding heat maps all call :func:`sinkhorn_log`.

Problem (per batch element ``b``), with ``eps > 0``::

    T* = argmin_T <T, C> - eps * H(T)   s.t.  T 1 = a,  T^T 1 = c,  T >= 0,
    H(T) = -sum_kl T_kl (log T_kl - 1),

``a`` uniform over the valid rows, ``c`` uniform over the valid columns, and
zero mass on padding. The fixed point is the same as POT's
``ot.sinkhorn(a, c, C, eps, method="sinkhorn_log")``.

How it is fast and still stable. Every Sinkhorn iteration is the log-domain
update ``alpha = log a - LSE_l(-C/eps + beta)``, ``beta = log c - LSE_k(-C/eps + alpha)``.
We carry it out in two equivalent forms:

* every ``check_every``-th iteration (and the first) in the log domain, with a
  max-stabilised log-sum-exp: exact for any ``eps``; the potentials are then
  absorbed into a kernel ``G = exp(-C/eps + alpha + beta)`` (the current plan,
  whose entries are <= 1, so it cannot overflow);
* the iterations in between as plain scaling updates on that kernel,
  ``u = a / (G v)``, ``v = c / (G^T u)``: two batched mat-vecs, no ``exp``.

This is the "stabilised scaling" scheme of Schmitzer (2019, SIAM J. Sci.
Comput. 41(3)), specialised to absorbing at fixed intervals. Mathematically the
iterates equal those of the pure log-domain solver (POT ``ot.batch`` with
``method="log_sinkhorn"``); only where a whole kernel row or column underflows
(tiny ``eps``, far from convergence) do the scalings get clamped, which delays
convergence to the next log-domain step but never produces inf or NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["SinkhornResult", "sinkhorn_log", "uniform_marginals"]


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn_log`.

    ``plan``: (B, K, M) transport plans, exactly zero on padded rows/columns.
    ``iterations``: Sinkhorn iterations performed (same for the whole batch).
    ``marginal_error``: 0-dim tensor, max over problems of the L1 row-marginal
    error ``sum_k |(T 1)_k - a_k|`` of the returned plan (its column marginals are
    exact up to rounding, since the last update is a column update).
    """

    plan: torch.Tensor
    iterations: int
    marginal_error: torch.Tensor


def uniform_marginals(
    row_mask: torch.Tensor, col_mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform marginals over valid entries; a problem with no valid row or no valid column gets none.

    Returns ``(a, c, row_valid, col_valid)``, where ``row_valid``/``col_valid`` are the masks
    that actually carry mass (a problem with an empty side is fully invalid).
    """
    nonempty = row_mask.any(dim=1) & col_mask.any(dim=1)
    row_valid = row_mask & nonempty[:, None]
    col_valid = col_mask & nonempty[:, None]
    a = row_valid.to(dtype) / row_valid.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
    c = col_valid.to(dtype) / col_valid.sum(dim=1, keepdim=True).clamp(min=1).to(dtype)
    return a, c, row_valid, col_valid


def _log_row_update(
    neg_cost: torch.Tensor, beta: torch.Tensor, log_a: torch.Tensor, row_valid: torch.Tensor
) -> torch.Tensor:
    """alpha = log a - LSE_l(-C/eps + beta), zero on invalid rows (never -inf - -inf)."""
    alpha = log_a - torch.logsumexp(neg_cost + beta[:, None, :], dim=2)
    return torch.where(row_valid, alpha, torch.zeros_like(alpha))


def _log_col_update(
    neg_cost: torch.Tensor, alpha: torch.Tensor, log_c: torch.Tensor, col_valid: torch.Tensor
) -> torch.Tensor:
    beta = log_c - torch.logsumexp(neg_cost + alpha[:, :, None], dim=1)
    return torch.where(col_valid, beta, torch.zeros_like(beta))


def _log_step(
    neg_cost: torch.Tensor,
    beta: torch.Tensor,
    v: torch.Tensor,
    log_a: torch.Tensor,
    log_c: torch.Tensor,
    row_valid: torch.Tensor,
    col_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorb the column scaling ``v`` into ``beta``, one exact log-domain iteration, the stabilised kernel.

    Returns ``(kernel, beta)`` with ``kernel = exp(-C/eps + alpha + beta)`` (entries <= 1) after the
    row then column update. ``alpha`` needs no absorption: the row update depends on ``beta`` only.
    """
    beta = beta + torch.where(col_valid, v.squeeze(2).log(), torch.zeros_like(beta))
    alpha = _log_row_update(neg_cost, beta, log_a, row_valid)
    beta = _log_col_update(neg_cost, alpha, log_c, col_valid)
    kernel = torch.add(neg_cost, alpha[:, :, None]).add_(beta[:, None, :]).exp_()
    return kernel, beta


def _scaling_steps(
    kernel: torch.Tensor, a: torch.Tensor, c: torch.Tensor, tiny: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` scaling iterations ``u = a / (G v)``, ``v = c / (G^T u)`` on the kernel G, from ``v = 1``.

    Returns (u, v) of shapes (B, K, 1) and (B, M, 1); the plan is ``u * G * v^T``.
    """
    a, c = a[:, :, None], c[:, :, None]
    kernel_t = kernel.transpose(1, 2)
    u = torch.ones_like(a)
    v = torch.ones_like(c)
    for _ in range(steps):
        u = a / torch.bmm(kernel, v).clamp_(min=tiny)
        v = c / torch.bmm(kernel_t, u).clamp_(min=tiny)
    return u, v


_Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@functools.cache
def _compiled(step: _Step) -> _Step:
    """``torch.compile`` of one solver step, built once per process; whole graphs only (no silent graph break)."""
    return torch.compile(step, fullgraph=True)


@torch.no_grad()
def sinkhorn_log(
    cost: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    eps: float = 0.05,
    max_iter: int = 50,
    tol: float = 1e-4,
    check_every: int = 10,
    fixed_iterations: bool = False,
    compiled: bool = False,
) -> SinkhornResult:
    """Entropic OT plans for a batch of padded problems (METHOD.md, Losses 3).

    Args:
        cost: (B, K, M) cost matrices. Values at padded positions are ignored.
        row_mask: (B, K) bool, True for valid rows (patches); None = all valid.
        col_mask: (B, M) bool, True for valid columns (sentences); None = all valid.
        eps: entropic regularisation (> 0); stable down to 1e-3 and below.
        max_iter: maximum number of Sinkhorn iterations (one row + one column update each).
        tol: stop once the L1 row-marginal error of every problem is below ``tol``.
            Checked every ``check_every`` iterations only, so an accelerator syncs rarely;
            ``tol <= 0`` runs exactly ``max_iter`` iterations.
        check_every: interval of log-domain (re-stabilising) iterations and convergence checks.
        fixed_iterations: run exactly ``max_iter`` iterations whatever ``tol`` (as ``tol <= 0``): the loop
            then never reads a tensor on the host (no ``.item()``, no ``bool(tensor)``: no accelerator
            sync); the returned ``marginal_error`` is computed on the device, for logging only.
        compiled: run the log-domain step and the scaling steps through ``torch.compile`` (inductor: a
            C++ compiler on CPU, triton on GPU); the first call per shape compiles, later calls reuse it.

    Guarantees: no gradient (the plan is meant to be used through the envelope theorem,
    see :mod:`mlip_dist.losses.local_ot`); computed in float32, or float64 for float64
    input, even under autocast; padded rows/columns and problems without a valid row or
    column get exactly zero mass; the result is finite for any finite cost. The iterates
    do not depend on ``fixed_iterations`` or ``compiled`` (up to rounding for ``compiled``).
    """
    if cost.dim() != 3:
        raise ValueError(f"sinkhorn_log: cost must be (B, K, M), got shape {tuple(cost.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn_log: eps must be positive, got {eps}")
    if check_every < 1:
        raise ValueError(f"sinkhorn_log: check_every must be >= 1, got {check_every}")
    if max_iter < 1:
        raise ValueError(f"sinkhorn_log: max_iter must be >= 1, got {max_iter}")
    batch, rows, cols = cost.shape
    device = cost.device
    if row_mask is None:
        row_mask = torch.ones(batch, rows, dtype=torch.bool, device=device)
    if col_mask is None:
        col_mask = torch.ones(batch, cols, dtype=torch.bool, device=device)
    if row_mask.shape != (batch, rows) or col_mask.shape != (batch, cols):
        raise ValueError(
            f"sinkhorn_log: masks {tuple(row_mask.shape)}, {tuple(col_mask.shape)} do not match cost "
            f"{tuple(cost.shape)}"
        )
    dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
    adaptive = tol > 0 and not fixed_iterations
    log_step = _compiled(_log_step) if compiled else _log_step
    scaling_steps = _compiled(_scaling_steps) if compiled else _scaling_steps
    # bf16/fp16 would make exp(-C/eps) meaningless at eps=0.05: always solve in fp32 or better.
    with torch.autocast(device_type=device.type, enabled=False):
        a, c, row_valid, col_valid = uniform_marginals(row_mask.bool(), col_mask.bool(), dtype)
        pair_valid = row_valid[:, :, None] & col_valid[:, None, :]
        # -C/eps computed once; -inf on padding makes the kernel exactly zero there.
        neg_cost = cost.to(dtype=dtype, copy=True)
        neg_cost.mul_(-1.0 / eps)
        neg_cost.masked_fill_(~pair_valid, float("-inf"))
        log_a = torch.where(row_valid, a.log(), torch.zeros_like(a))
        log_c = torch.where(col_valid, c.log(), torch.zeros_like(c))
        # Smallest denominator we accept: an all-underflowed kernel row then keeps zero
        # mass (u = a / tiny is finite) until the next log-domain step rescues it.
        tiny = torch.finfo(dtype).tiny

        beta = torch.zeros(batch, cols, dtype=dtype, device=device)
        u = torch.ones(batch, rows, 1, dtype=dtype, device=device)
        v = torch.ones(batch, cols, 1, dtype=dtype, device=device)
        kernel: torch.Tensor | None = None  # set by the first iteration, a log-domain step
        marginal_error = torch.zeros((), dtype=dtype, device=device)
        iterations = 0
        while iterations < max_iter:
            # Every check_every-th iteration (and the first) is a log-domain step that re-stabilises.
            kernel, beta = log_step(neg_cost, beta, v, log_a, log_c, row_valid, col_valid)
            u, v = torch.ones_like(u), torch.ones_like(v)
            iterations += 1
            if adaptive:
                # Columns are exact after the column update; rows carry the whole error.
                marginal_error = (kernel.sum(dim=2) - a).abs().sum(dim=1).max() if batch else marginal_error
                if bool(marginal_error < tol):  # the one host read per check_every iterations
                    break
            # The iterations in between: plain scaling steps on the stabilised kernel.
            steps = min(check_every - 1, max_iter - iterations)
            if steps:
                u, v = scaling_steps(kernel, a, c, tiny, steps)
                iterations += steps

        assert kernel is not None
        plan = kernel.mul_(u).mul_(v.transpose(1, 2))
        # Padded entries are exactly zero already (exp(-inf) = 0, u = 0 on padded rows).
        if batch:
            marginal_error = (plan.sum(dim=2) - a).abs().sum(dim=1).max()
    return SinkhornResult(plan=plan, iterations=iterations, marginal_error=marginal_error)
