"""What a training run carries from step to step and from checkpoint to resume: the step, the samples seen,
the run's fault counts (summed over ranks) and the data layout it was saved with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

# Per-rank counts: each rank counts what its own loader met; the run's count is the sum over ranks.
RANK_COUNTS = ("skipped_samples", "lost_samples", "shard_errors")


@dataclass
class RunCounts:
    """Fault counts of the whole run (every launch, every rank).

    - ``skipped_samples``: samples that could not be decoded (corrupt image, bad JSON, no sentences), each
      replaced in its batch; summed over ranks.
    - ``lost_samples``: samples listed in ``dataset.json`` that a cut or unreadable shard no longer holds;
      summed over ranks.
    - ``shard_errors``: shards found cut or unreadable, each counted once per rank and launch that met it;
      summed over ranks.
    - ``skipped_steps``: optimizer steps skipped for a non-finite loss or gradient. Every rank skips the same
      steps together, so this is counted once, not summed.
    """

    skipped_samples: int = 0
    lost_samples: int = 0
    shard_errors: int = 0
    skipped_steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class CountLedger:
    """The run's counts at the resume point (identical on every rank) plus this launch's per-rank counts."""

    base: RunCounts = field(default_factory=RunCounts)
    local: RunCounts = field(default_factory=RunCounts)
    bad_shards: set[str] = field(default_factory=set)

    def add_batch(self, batch: Any) -> None:
        """Count the faults the loader met while building ``batch`` (an ``MLIPBatch``)."""
        self.local.skipped_samples += batch.num_skipped
        self.local.lost_samples += batch.num_lost
        self.bad_shards.update(batch.shard_errors)
        self.local.shard_errors = len(self.bad_shards)

    def local_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([getattr(self.local, name) for name in RANK_COUNTS], dtype=torch.float64, device=device)

    def run_counts(self, summed_local: torch.Tensor | list[float]) -> RunCounts:
        """The run's counts from the all-reduced (summed) :meth:`local_tensor`."""
        summed = {name: getattr(self.base, name) + int(round(float(value)))
                  for name, value in zip(RANK_COUNTS, summed_local, strict=True)}
        return RunCounts(**summed, skipped_steps=self.base.skipped_steps + self.local.skipped_steps)

    def reduce(self, device: torch.device) -> RunCounts:
        """The run's counts, summed over ranks (collective)."""
        local = self.local_tensor(device)
        if dist.is_initialized():
            dist.all_reduce(local)
        return self.run_counts(local.tolist())


@dataclass(frozen=True)
class DataLayout:
    """How the data was dealt when a checkpoint was written; compared with the resuming launch's."""

    world_size: int
    num_workers: int
    global_batch_size: int
    steps_per_epoch: int

    def changes_from(self, saved: DataLayout) -> list[str]:
        return [f"{f.name} {getattr(saved, f.name)} -> {getattr(self, f.name)}" for f in fields(self)
                if getattr(saved, f.name) != getattr(self, f.name)]


@dataclass
class TrainingState:
    step: int = 0
    samples_seen: int = 0
    counts: CountLedger = field(default_factory=CountLedger)

    def client_state(self, run_counts: RunCounts, layout: DataLayout) -> dict[str, Any]:
        """What a checkpoint stores besides the engine (DeepSpeed's ``client_state``)."""
        return {"step": self.step, "samples_seen": self.samples_seen, "data_position": self.step,
                "counts": run_counts.as_dict(), "layout": asdict(layout),
                "steps_per_epoch": layout.steps_per_epoch}

    @classmethod
    def from_client_state(cls, client_state: dict[str, Any]) -> TrainingState:
        base = RunCounts(**{k: int(v) for k, v in (client_state.get("counts") or {}).items()
                            if k in {f.name for f in fields(RunCounts)}})
        return cls(step=int(client_state["step"]), samples_seen=int(client_state["samples_seen"]),
                   counts=CountLedger(base=base))
