"""Issue 17: a training step that does not log makes no host sync and no collective of the trainer's own.

Counted in-process on a one-rank DeepSpeed engine (tests/tiny_engines.py): host syncs with a
``TorchDispatchMode`` (``aten._local_scalar_dense``, ``aten.is_nonzero``, ``aten.item``: what ``.item()``,
``float()``, ``bool()`` of a tensor dispatch), collectives by patching ``torch.distributed``, device syncs by
patching ``torch.cuda.synchronize``. What DeepSpeed does inside the engine's forward, ``backward`` and
``step`` (its own gradient reduction and overflow check) is not counted: everything else is the trainer's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from tiny_engines import full_params, make_engine  # noqa: E402

SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.item"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "barrier", "reduce", "all_to_all_single", "all_gather_object", "broadcast_object_list")


class TrainerSyncs(TorchDispatchMode):
    """Host syncs, collectives and device synchronisations made outside the engine's own calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inside_engine = 0
        self.syncs: list[str] = []
        self.collectives: list[str] = []
        self.device_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(getattr(func, "overloadpacket", func))
        if not self.inside_engine and name in SYNC_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))

    def engine_call(self, method):
        def wrapped(*args, **kwargs):
            self.inside_engine += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.inside_engine -= 1

        return wrapped

    def patch(self, monkeypatch, engine) -> None:
        for name in ("forward", "backward", "step"):  # DeepSpeed's own work, not the trainer's
            monkeypatch.setattr(engine, name, self.engine_call(getattr(engine, name)))
        with_terms(monkeypatch, engine)
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                monkeypatch.setattr(dist, name, self.counting(name, original))
        monkeypatch.setattr(torch.cuda, "synchronize", self.count_device_sync)

    def counting(self, name, original):
        def wrapped(*args, **kwargs):
            if not self.inside_engine:
                self.collectives.append(name)
            return original(*args, **kwargs)

        return wrapped

    def count_device_sync(self, *args, **kwargs) -> None:
        self.device_syncs += 1  # never reaches CUDA: the test runs on CPU tensors


def with_terms(monkeypatch, engine) -> None:
    """TinyNet returns the loss alone; MLIPTrainingModule, as ``train_step`` expects, (loss, terms)."""
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda *args, **kwargs: (forward(*args, **kwargs), None))


class OnDevice:
    """A loader batch: ``.to`` is where ``train_step`` copies it to the device (here it stays on the CPU)."""

    def __init__(self, x: torch.Tensor, poison: bool = False):
        self.batch = (x, torch.tensor([poison]))

    def to(self, device, dtype=None):
        return self.batch


def batches(n: int, nan_at: int | None = None):
    for i in range(n):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        if i == nan_at:
            x[1, 2] = float("nan")
        yield OnDevice(x)


# "cuda": train_step and optimizer_step use the device only to synchronise and for the flags' all-reduce, so a
# CUDA device here turns any torch.cuda.synchronize into a counted call and any flag all-reduce into a failure.
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_that_does_not_log_makes_no_host_sync_and_no_collective_of_its_own(single_rank_group, monkeypatch,
                                                                                 stage):
    from mlip_dist.training.step import StepOutcome, train_step

    engine = make_engine(stage)
    counter = TrainerSyncs()
    counter.patch(monkeypatch, engine)
    iterator = batches(4)
    train_step(engine, iterator, CUDA, None, log=False)  # the first step allocates DeepSpeed's state
    with counter:
        for _ in range(2):
            result, _ = train_step(engine, iterator, CUDA, None, log=False)
            assert result.outcome is StepOutcome.APPLIED
    assert (counter.syncs, counter.collectives, counter.device_syncs) == ([], [], 0)

    # A logging step synchronises (timings, the gradient-norm check): the counter sees it.
    with counter:
        train_step(engine, iterator, torch.device("cpu"), None, log=True)
    assert counter.syncs


def test_the_counter_catches_an_item_on_the_loss_every_step(single_rank_group, monkeypatch):
    """Re-adding ``loss.item()`` (or an all-reduced flag) to the step fails the test above."""
    from mlip_dist.training import step

    engine = make_engine(2)
    original = step.optimizer_step

    def with_item(engine, loss, device, **kwargs):
        step.any_rank(not bool(torch.isfinite(loss.detach()).item()), torch.device("cpu"))
        return original(engine, loss, device, **kwargs)

    monkeypatch.setattr(step, "optimizer_step", with_item)
    counter = TrainerSyncs()
    counter.patch(monkeypatch, engine)
    with counter:
        step.train_step(engine, batches(1), CUDA, None, log=False)
    assert "aten._local_scalar_dense" in counter.syncs and counter.collectives == ["all_reduce"]


def test_non_finite_loss_on_a_step_that_does_not_log_is_still_skipped_and_named(single_rank_group, monkeypatch):
    """Without the pre-backward check, a NaN loss gives NaN gradients (``loss * gate``) and DeepSpeed's
    overflow check skips the update; the skipped step alone pays the sync that names the cause."""
    from mlip_dist.training.step import StepOutcome, train_step

    engine = make_engine(2)
    with_terms(monkeypatch, engine)
    iterator = batches(3, nan_at=1)
    cpu = torch.device("cpu")
    outcomes = []
    for _ in range(3):
        before = full_params(engine)
        result, _ = train_step(engine, iterator, cpu, None, log=False)
        outcomes.append(result.outcome)
        if result.outcome is not StepOutcome.APPLIED:
            assert all(torch.equal(a, b) for a, b in zip(before, full_params(engine), strict=True))
    assert outcomes == [StepOutcome.APPLIED, StepOutcome.NONFINITE_LOSS, StepOutcome.APPLIED]
    assert engine.skipped_steps == 1


def test_a_logging_step_agrees_on_the_stop_flag_in_the_progress_all_reduce(single_rank_group, monkeypatch, tmp_path):
    """The loss terms, the fault counts and the stop flag share one all-reduce on a logging step."""
    from mlip_dist.training.progress import ProgressLog
    from mlip_dist.training.state import CountLedger
    from mlip_dist.training.step import StepResult, StepTimes

    class Terms:
        def scalars(self):
            return {"loss/total": 2.0, "loss/global": 1.5}

    engine = make_engine(2)
    counter = TrainerSyncs()
    counter.patch(monkeypatch, engine)
    progress = ProgressLog(None, tmp_path, rank=0, world_size=1, device=torch.device("cpu"), max_steps=10,
                           global_batch_size=4, resumed_at=0)
    ledger = CountLedger()
    ledger.local.skipped_samples = 3
    result = StepResult(terms=Terms(), times=StepTimes(0.0, 0.1, 0.1), outcome=None)
    for requested in (False, True):
        with counter:
            counts, stop = progress.log(1, result, ledger, 1e-3, stop_requested=requested)
        assert stop is requested and counts.skipped_samples == 3
    assert counter.collectives == ["all_reduce", "all_reduce"]  # one per logging step
    assert progress.loss_history == [2.0, 2.0]
