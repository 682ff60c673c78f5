"""The run's checkpointer: restores a training state, saves one (periodic, final, signal, best) and keeps
the best checkpoint by the validation metric besides the last ``keep_last`` (timm's CheckpointSaver idea).

File layout and crash-safety are ``training/checkpoint.py``'s; this object holds what one run needs to call
it: the engine, the folder, the fp32 copies of frozen layers and the best metric so far.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from mlip_dist.config import TrainConfig
from mlip_dist.training import checkpoint as ckpt
from mlip_dist.training.engine import apply_adamw_implementation
from mlip_dist.training.state import DataLayout, RunCounts, TrainingState
from mlip_dist.training.validation import best_improved

logger = logging.getLogger(__name__)


def resume_tag(checkpoint_dir: Path, resume: str) -> str | None:
    """The tag ``--resume`` names: ``auto`` the latest complete one (None on a fresh run), ``none``, or a tag."""
    if resume == "auto":
        return ckpt.find_latest(checkpoint_dir)
    if resume == "none":
        return None
    if not (checkpoint_dir / resume / ckpt.COMPLETE_MARKER).is_file():
        raise SystemExit(f"--resume {resume}: {checkpoint_dir / resume} is not a complete checkpoint")
    return resume


def saved_world_size(checkpoint_dir: Path, tag: str) -> int | None:
    """The world size ``tag`` was saved with (from its ``complete.json``; None for checkpoints before it)."""
    import json

    info = json.loads((checkpoint_dir / tag / ckpt.COMPLETE_MARKER).read_text())
    return info.get("world_size")


def prepare_universal(checkpoint_dir: Path, tag: str, rank: int) -> Path:
    """Convert ``tag`` to DeepSpeed's universal checkpoint (``ds_to_universal``: the ZeRO partitions of the fp32
    masters and Adam moments merged per parameter), which loads at any world size. Collective; rank 0 converts
    once (into a temp folder, then renamed) and later launches reuse it. Returns the folder to load from."""
    import argparse
    import shutil

    import torch.distributed as dist

    root = checkpoint_dir / ckpt.UNIVERSAL_DIR
    final = root / tag
    if rank == 0 and not final.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = root / f".{tag}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        logger.info("converting %s to a universal checkpoint for the new world size", checkpoint_dir / tag)
        ds_to_universal(argparse.Namespace(
            input_folder=str(checkpoint_dir / tag), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        tmp.rename(final)
    dist.barrier()
    return root


class Checkpointer:
    def __init__(self, engine: Any, checkpoint_dir: Path, *, rank: int, train: TrainConfig,
                 frozen: dict[str, torch.Tensor]):
        self.engine, self.dir, self.rank, self.train, self.frozen = engine, checkpoint_dir, rank, train, frozen
        self.metric = train.best_metric.value
        best = ckpt.read_best(checkpoint_dir)
        self.best_value: float | None = best["value"] if best and best.get("metric") == self.metric else None

    def restore(self, tag: str, universal_root: Path | None = None) -> tuple[TrainingState, DataLayout | None]:
        """Load engine, optimizer and scheduler state of ``tag`` (from ``universal_root`` when the world size
        changed: the engine was built with ``checkpoint.load_universal``); the training state and the saved
        layout. The RNG states are :meth:`restore_rng`'s, called last, after set-up that may draw numbers."""
        load_dir = universal_root if universal_root is not None else self.dir
        load_path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if load_path is None:
            raise SystemExit(f"could not load checkpoint {self.dir / tag}")
        apply_adamw_implementation(self.engine, self.train.fused_adamw)  # this run's setting, not the saved one
        layout = client_state.get("layout")
        return TrainingState.from_client_state(client_state), DataLayout(**layout) if layout else None

    def restore_rng(self, tag: str) -> None:
        """This rank's Python, numpy and torch RNG states as saved with ``tag`` (dropout continues exactly)."""
        if not ckpt.load_rng(self.dir, tag, self.rank):
            logger.warning("no RNG state of rank %d in %s (saved with fewer ranks): dropout draws differ from an "
                           "uninterrupted run's", self.rank, self.dir / tag)

    def improved(self, metrics: dict[str, float]) -> dict[str, Any] | None:
        """``{"metric", "value"}`` when ``metrics`` beat the best so far (then it is the new best), else None."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value) or not best_improved(self.metric, value, self.best_value):
            return None
        self.best_value = value
        return {"metric": self.metric, "value": value}

    def save(self, state: TrainingState, counts: RunCounts, layout: DataLayout, reason: str,
             best: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None) -> str:
        """Collective. Writes the checkpoint of ``state.step``; with ``best`` it becomes the run's best.
        ``weights``: the fp32 state validation gathered at this step, reused for ``model.safetensors``."""
        info = {"step": state.step, "samples_seen": state.samples_seen, "reason": reason,
                "world_size": layout.world_size, "global_batch_size": layout.global_batch_size}
        tag = ckpt.save_training_checkpoint(
            self.engine, self.dir, state.step, state.client_state(counts, layout), info, rank=self.rank,
            keep_last=self.train.keep_last, consolidated=self.train.save_consolidated, frozen=self.frozen, best=best,
            weights=weights)
        suffix = f"; best {best['metric']} = {best['value']:.4f}" if best else ""
        logger.info("saved checkpoint %s (%s%s)", self.dir / tag, reason, suffix)
        return tag
