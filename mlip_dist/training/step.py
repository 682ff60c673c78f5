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


def optimizer_step(engine: Any, loss: torch.Tensor, device: torch.device) -> StepOutcome:
    """Backward and optimizer step, or a skipped step when the loss or a gradient is NaN/inf anywhere.

    Collective; every rank returns the same outcome. Guarantees:
    - A non-finite loss on any rank (all-reduced flag) skips backward and step on every rank.
    - A non-finite gradient leaves parameters, optimizer moments and the LR schedule untouched. ZeRO-1/2/3:
      DeepSpeed's ZeRO optimizer computes the global gradient norm in ``step`` (already reduced over
      ranks, so no extra collective) and, for fp32 and for bf16 with ``bf16.check_grad_overflow`` (on by
      default), discards the update when it is NaN/inf and counts it in ``engine.skipped_steps``.
      ZeRO-0 has no such check: the all-reduced ``param.grad`` are inspected before ``step``.
    Raises ``FloatingPointError`` if DeepSpeed reports a non-finite norm yet applied the update.
    """
    if any_rank(not bool(torch.isfinite(loss.detach()).item()), device):
        return StepOutcome.NONFINITE_LOSS
    engine.backward(loss)
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if any_rank(bad, device):
            engine.zero_grad()
            return StepOutcome.NONFINITE_GRAD
        engine.step()
        return StepOutcome.APPLIED
    skipped_before = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    skipped = engine.skipped_steps > skipped_before
    if norm is not None and not math.isfinite(float(norm)) and not skipped:
        raise FloatingPointError(
            f"DeepSpeed applied an update with a non-finite gradient norm ({norm}); the weights are no longer "
            "usable: resume from the last complete checkpoint"
        )
    return StepOutcome.NONFINITE_GRAD if skipped else StepOutcome.APPLIED


@dataclass
class StepTimes:
    """Wall seconds of one step's phases (``forward`` and ``backward_step`` synchronised on GPUs)."""

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


def train_step(engine: Any, loader_iterator: Any, device: torch.device, image_dtype: torch.dtype | None) -> tuple[
        StepResult, Any]:
    """Fetch the next micro-batch, move it to ``device``, forward, backward and step (:func:`optimizer_step`).

    Returns the result and the batch as the loader gave it (its fault counts are the caller's to add up).
    """
    started = time.perf_counter()
    batch = next(loader_iterator)
    on_device = batch.to(device, dtype=image_dtype)
    fetched = time.perf_counter()
    loss, terms = engine(on_device)
    synchronize(device)
    forwarded = time.perf_counter()
    outcome = optimizer_step(engine, loss, device)
    synchronize(device)
    finished = time.perf_counter()
    return StepResult(outcome, terms, StepTimes(fetched - started, forwarded - fetched, finished - forwarded)), batch
