"""What a run reports as it goes: every ``log_every`` steps the loss terms averaged over ranks, the run's
fault counts summed over ranks, timings, throughput and the LR (TensorBoard on rank 0 and the console);
validation metrics under ``val/`` and in ``val_history.jsonl``.

A logging step makes one all-reduce (loss terms and counts together); other steps make none.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mlip_dist.training.checkpoint import atomic_write_text
from mlip_dist.training.state import CountLedger, RunCounts
from mlip_dist.training.step import StepResult

logger = logging.getLogger("mlip_dist.pretrain")
VAL_HISTORY = "val_history.jsonl"


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def truncate_history(path: Path, after_step: int) -> None:
    """Drop the lines of a JSON-lines history written after ``after_step`` (a resumed run writes them again)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= after_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class ProgressLog:
    def __init__(self, writer: Any, out_dir: Path, *, rank: int, world_size: int, device: torch.device,
                 max_steps: int, global_batch_size: int, resumed_at: int):
        self.writer, self.rank, self.world_size, self.device = writer, rank, world_size, device
        self.max_steps, self.global_batch_size = max_steps, global_batch_size
        self.val_history = out_dir / VAL_HISTORY
        self.loss_history: list[float] = []
        if rank == 0:
            truncate_history(self.val_history, resumed_at)

    def log(self, step: int, result: StepResult, ledger: CountLedger, lr: float,
            stop_requested: bool = False) -> tuple[RunCounts, bool]:
        """Collective. Averages the loss terms over ranks, sums the fault counts and agrees on the stop flag
        (True on every rank when one rank's ``stop_requested`` is), all in one all-reduce."""
        values = result.terms.scalars()
        local = torch.cat([torch.tensor([*values.values(), float(stop_requested)], dtype=torch.float64,
                                        device=self.device), ledger.local_tensor(self.device)])
        dist.all_reduce(local)
        summed = local.tolist()
        averaged = {name: value / self.world_size for name, value in zip(values, summed, strict=False)}
        stop_agreed = summed[len(values)] > 0
        counts = ledger.run_counts(summed[len(values) + 1:])
        self.loss_history.append(averaged["loss/total"])
        times = result.times
        throughput = self.global_batch_size / max(times.total, 1e-9)
        if self.writer is not None:
            scalars = {**averaged, "time/data_wait_s": times.data_wait, "time/forward_s": times.forward,
                       "time/backward_step_s": times.backward_step, "time/step_s": times.total,
                       "throughput/samples_per_s": throughput, "memory/peak_gib": memory_gib(self.device),
                       **{f"data/{name}": value for name, value in counts.as_dict().items()}, "lr": lr}
            self.writer.scalars(step, scalars)
        logger.info("step %d/%d loss %.4f (g %.4f l %.4f r %.4f) lr %.3g %.1f samples/s", step, self.max_steps,
                    averaged["loss/total"], averaged.get("loss/global", 0.0), averaged.get("loss/local", 0.0),
                    averaged.get("loss/reconstruction", 0.0), lr, throughput)
        return counts, stop_agreed

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        summary = ", ".join(f"{name.removeprefix('val/')} {value:.4f}" for name, value in metrics.items())
        logger.info("validation at step %d: %s", step, summary)
        if self.rank != 0:
            return
        if self.writer is not None:
            self.writer.scalars(step, metrics)
        with self.val_history.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
