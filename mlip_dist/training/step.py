"""One training step: host-to-device copy, forward, backward and optimizer step, with its outcome and timings.

The step is collective (every rank calls it with its micro-batch) and every rank returns the same outcome.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class StepOutcome(str, enum.Enum):
    APPLIED = "applied"
    NONFINITE_LOSS = "non-finite loss"
    NONFINITE_GRAD = "non-finite gradient"


def optimizer_step(engine: Any, loss: torch.Tensor, device: torch.device, *, check_norm: bool = True) -> StepOutcome:
    """Backward and optimizer step, or a skipped step when the loss or a gradient is NaN/inf anywhere.

    Collective; every rank returns the same outcome. Guarantees:
    - A non-finite gradient leaves parameters, optimizer moments and the LR schedule untouched. ZeRO-1/2/3:
      DeepSpeed's ZeRO optimizer computes the global gradient norm in ``step`` (already reduced over
      ranks, so no extra collective) and, for fp32 and for bf16 with ``bf16.check_grad_overflow`` (on by
      default), discards the update when it is NaN/inf and counts it in ``engine.skipped_steps``.
      ZeRO-0 has no such check: the all-reduced ``param.grad`` are inspected before ``step``.
    - A non-finite loss on any rank skips the update on every rank, the same way. ZeRO-1/2/3: backward runs on
      ``loss * gate``, where ``gate`` is 1 for a finite loss (value and gradient unchanged, bit for bit) and NaN
      otherwise, so a non-finite loss always gives NaN gradients and DeepSpeed's overflow check above skips the
      step. No host sync and no collective before backward: only a skipped step (rare) pays one all-reduce, to
      tell a non-finite loss from a non-finite gradient. ZeRO-0: the loss flag is all-reduced before backward.
    - ``check_norm`` (the trainer passes it on logging steps only; it costs a host sync): raise
      ``FloatingPointError`` if DeepSpeed reports a non-finite norm yet applied the update. Without it the step
      reads only ``engine.skipped_steps`` (a Python int). A non-finite update applied unnoticed makes every
      later loss NaN, so the run still stops after ``train.max_bad_steps`` skipped steps.
    """
    if engine.zero_optimization_stage() == 0:
        if any_rank(not bool(torch.isfinite(loss.detach()).item()), device):
            return StepOutcome.NONFINITE_LOSS
        engine.backward(loss)
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if any_rank(bad, device):
            engine.zero_grad()
            return StepOutcome.NONFINITE_GRAD
        engine.step()
        return StepOutcome.APPLIED
    gate = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
    skipped_before = engine.skipped_steps
    engine.backward(loss * gate)
    engine.step()
    if engine.skipped_steps > skipped_before:  # every rank sees it: the norm is reduced over ranks
        if any_rank(not bool(torch.isfinite(loss.detach()).item()), device):
            return StepOutcome.NONFINITE_LOSS
        return StepOutcome.NONFINITE_GRAD
    if check_norm:
        norm = engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise FloatingPointError(
                f"DeepSpeed applied an update with a non-finite gradient norm ({norm}); the weights are no longer "
                "usable: resume from the last complete checkpoint"
            )
    return StepOutcome.APPLIED


@dataclass
class StepTimes:
    """Wall seconds of one step's phases (``forward`` and ``backward_step`` synchronised on GPUs on logging
    steps only; elsewhere they are the host's dispatch times and nobody reads them)."""

    data_wait: float
    forward: float
    backward_step: float

    @property
    def total(self) -> float:
        return self.data_wait + self.forward + self.backward_step


@dataclass
class StepResult:
    outcome: StepOutcome
    terms: Any  # the loss module's LossTerms (every term, for logging)
    times: StepTimes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(engine: Any, loader_iterator: Any, device: torch.device, image_dtype: torch.dtype | None, *,
               log: bool = True) -> tuple[StepResult, Any]:
    """Fetch the next micro-batch, move it to ``device``, forward, backward and step (:func:`optimizer_step`).

    ``log``: this step's result will be logged. Only then are the timings synchronised with the device and
    the gradient norm read (host syncs); a step with ``log=False`` makes no host sync and no collective of
    its own at ZeRO-1/2/3 unless it is skipped (tests/test_step_syncs.py).
    Returns the result and the batch as the loader gave it (its fault counts are the caller's to add up).
    """
    started = time.perf_counter()
    batch = next(loader_iterator)
    on_device = batch.to(device, dtype=image_dtype)
    fetched = time.perf_counter()
    loss, terms = engine(on_device)
    if log:
        synchronize(device)
    forwarded = time.perf_counter()
    outcome = optimizer_step(engine, loss, device, check_norm=log)
    if log:
        synchronize(device)
    finished = time.perf_counter()
    return StepResult(outcome, terms, StepTimes(fetched - started, forwarded - fetched, finished - forwarded)), batch
