"""MLIP pre-training with DeepSpeed ZeRO (the project's main job).

    deepspeed --num_nodes 4 --hostfile H mlip_dist/pretrain.py --config cfg.yaml \\
        --deepspeed_config ds_configs/zero2.json [--resume auto] [--train.lr 1e-4 ...]
    torchrun --nproc_per_node 2 mlip_dist/pretrain.py --config cfg.yaml ...

The config is loaded and validated before any process group starts; nccl is used on GPUs and
gloo on CPUs. This file only wires library pieces together (STYLE.md: library apart from application).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from mlip_dist.config import MLIPConfig, load_config, to_dict
from mlip_dist.data import remote
from mlip_dist.data.loader import read_dataset_info
from mlip_dist.logging_utils import quiet_startup, setup_logging
from mlip_dist.model_io import load_tokenizer
from mlip_dist.training import checkpoint as ckpt
from mlip_dist.training.checkpointer import Checkpointer, prepare_universal, resume_tag, saved_world_size
from mlip_dist.training.ds_config import build_deepspeed_config, resolve_micro_batch
from mlip_dist.training.progress import ProgressLog
from mlip_dist.training.state import DataLayout, TrainingState
from mlip_dist.training.step import StepOutcome, any_rank, optimizer_step, train_step

__all__ = ["main", "train", "StepOutcome", "optimizer_step"]  # the step's pieces live in training/step.py

logger = logging.getLogger("mlip_dist.pretrain")
DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON training config (mlip_dist.config.MLIPConfig)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=str(DEFAULT_DS_CONFIG),
                        help="ZeRO layout template from ds_configs/ ('auto' values come from the training config)")
    parser.add_argument("--resume", default="auto", help="auto (latest complete checkpoint, if any) | none | <tag>")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next logging or saving step
    (within ``train.log_every`` steps)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        logger.warning("received signal %d: will checkpoint and exit at the next logging step", signum)
        self.requested = True


def bf16_is_fast() -> bool:
    """Where ``train.precision: auto`` picks bf16: a GPU with bf16 units. (bf16 also runs on the CPU when asked
    for with ``train.precision: bf16``, but there it is slower than fp32.)"""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def launch_world_size() -> int:
    """The world size the launcher (deepspeed, torchrun, SLURM through torchrun) announces to each rank."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class RunContext:
    """Rank, world size and device of this process, after the process group started."""

    def __init__(self, config: MLIPConfig, local_rank: int):
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        with quiet_startup():  # DeepSpeed's CPU comm-op build notices, nothing a user can act on
            deepspeed.init_distributed(dist_backend=backend,
                                       timeout=datetime.timedelta(seconds=config.train.collective_timeout_s))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        setup_logging(self.rank)
        if self.world_size != launch_world_size():
            raise SystemExit(f"the launcher announced WORLD_SIZE={launch_world_size()} but the process group has "
                             f"{self.world_size} ranks; the DeepSpeed config was built for the former")
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)


def refuse_silent_redeal(saved: DataLayout | None, current: DataLayout) -> None:
    """A resumed run must continue the global sample order it was saved with (see data/loader.py)."""
    if saved is None:
        return
    changes = current.changes_from(saved)
    if saved.global_batch_size != current.global_batch_size or saved.steps_per_epoch != current.steps_per_epoch:
        raise SystemExit(
            f"cannot resume exactly: {', '.join(changes)}. The global batch size and the epoch length decide which "
            "samples each step sees; resume with train.global_batch_size "
            f"{saved.global_batch_size} and the same shards, or start a new run (--resume none, a new output_dir)")
    if changes:
        logger.warning("resuming with a changed layout (%s): the global batches continue exactly as saved",
                       ", ".join(changes))


def train(config: MLIPConfig, ds_config: dict[str, Any], resume: str, local_rank: int) -> dict[str, Any]:
    from mlip_dist.data.loader import build_train_loader
    from mlip_dist.data.prefetch import DevicePrefetcher
    from mlip_dist.training.engine import build_engine
    from mlip_dist.training.heatmaps import HeatmapLogger
    from mlip_dist.training.tensorboard import TrainLogger
    from mlip_dist.training.validation import Validator

    run = RunContext(config, local_rank)
    remote.configure_from(config.data)  # cache settings for this process (the loader workers inherit them)
    torch.manual_seed(config.train.seed + run.rank)
    train_cfg, out_dir = config.train, Path(config.train.output_dir)
    if run.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out_dir / "config.json", json.dumps(to_dict(config), indent=2))
    checkpoint_dir = out_dir / "checkpoints"
    tag = resume_tag(checkpoint_dir, resume)
    universal_root = None
    if tag is not None and saved_world_size(checkpoint_dir, tag) not in (None, run.world_size):
        # ZeRO partitions are per rank: another world size loads DeepSpeed's universal form of the checkpoint.
        universal_root = prepare_universal(checkpoint_dir, tag, run.rank)
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, scheduler, frozen = build_engine(config, ds_config, run.rank, run.world_size)
    checkpointer = Checkpointer(engine, checkpoint_dir, rank=run.rank, train=train_cfg, frozen=frozen)
    state, saved_layout = checkpointer.restore(tag, universal_root) if tag is not None else (TrainingState(), None)
    if tag is not None:
        logger.info("resumed from %s at step %d (%d samples seen)", checkpoint_dir / tag, state.step,
                    state.samples_seen)

    tokenizer = load_tokenizer(config)
    loader, steps_per_epoch = build_train_loader(
        config.data.shards, config.data.train_split, tokenizer=tokenizer, rank=run.rank, world_size=run.world_size,
        micro_batch_size=resolve_micro_batch(train_cfg, run.world_size), global_batch_size=train_cfg.global_batch_size,
        image_size=config.model.image.image_size, in_chans=config.model.image.in_chans,
        max_length=config.model.text.max_length, max_sentences=config.model.max_sentences,
        num_workers=config.data.num_workers, shuffle_buffer=config.data.shuffle_buffer,
        resampled=config.data.resampled, augment=config.data.augment, seed=config.data.seed, start_batch=state.step,
        pin_memory=run.device.type == "cuda",
    )
    layout = DataLayout(world_size=run.world_size, num_workers=config.data.num_workers,
                        global_batch_size=train_cfg.global_batch_size, steps_per_epoch=steps_per_epoch)
    refuse_silent_redeal(saved_layout, layout)
    writer = TrainLogger(out_dir / "tensorboard", config, resumed_at=state.step) if run.rank == 0 else None
    progress = ProgressLog(writer, out_dir, rank=run.rank, world_size=run.world_size, device=run.device,
                           max_steps=train_cfg.max_steps, global_batch_size=train_cfg.global_batch_size,
                           resumed_at=state.step)
    validator = Validator(config, tokenizer, run.device, run.rank, run.world_size) if train_cfg.eval_every else None
    heatmaps = None
    if train_cfg.image_log_every > 0:
        try:
            read_dataset_info(config.data.shards, config.data.val_split)
            heatmaps = HeatmapLogger(config, tokenizer, run.device, split=config.data.val_split)
        except (FileNotFoundError, KeyError) as err:
            logger.warning("no heat-map images: %s", err)

    bf16 = bool(ds_config["bf16"]["enabled"])
    last_step = min(train_cfg.max_steps, train_cfg.stop_at_step or train_cfg.max_steps)
    first_step, bad_steps = state.step, 0
    stop = StopRequest()
    image_dtype = torch.bfloat16 if bf16 else None
    iterator = DevicePrefetcher(iter(loader), run.device, image_dtype)  # the next batch's copy overlaps this step
    engine.train()
    if tag is not None:
        checkpointer.restore_rng(tag)  # last: the set-up above may draw random numbers
    logger.info("training: %d ranks, micro batch %d, global batch %d, %d steps/epoch, steps %d -> %d, bf16=%s",
                run.world_size, resolve_micro_batch(train_cfg, run.world_size), train_cfg.global_batch_size,
                steps_per_epoch, state.step, train_cfg.max_steps, bf16)
    while state.step < last_step:
        # Only a logging step synchronises with the device (timings, gradient norm) and checks the stop flag.
        logging_step = (state.step + 1) % train_cfg.log_every == 0 or state.step + 1 == last_step
        result, batch = train_step(engine, iterator, run.device, image_dtype, log=logging_step)
        state.counts.add_batch(batch)
        state.step += 1
        state.samples_seen += train_cfg.global_batch_size
        bad_steps = 0 if result.outcome is StepOutcome.APPLIED else bad_steps + 1
        if bad_steps:
            state.counts.local.skipped_steps += 1
            logger.error("%s at step %d (%d in a row): step skipped", result.outcome.value, state.step, bad_steps)
            if bad_steps >= train_cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_steps} steps in a row with a non-finite loss or gradient (last: {result.outcome.value} at "
                    f"step {state.step}; train.max_bad_steps={train_cfg.max_bad_steps}); stopping. Lower train.lr, "
                    f"check the data, and resume from the last complete checkpoint in {checkpoint_dir}")
        at_end = state.step == last_step
        stop_agreed = None
        if logging_step:
            _, stop_agreed = progress.log(state.step, result, state.counts, scheduler.get_last_lr()[0],
                                          stop_requested=stop.requested)
        if heatmaps is not None and state.step % train_cfg.image_log_every == 0:
            heatmaps.log(engine.module.model, writer, state.step)
            engine.train()
        best, validated = None, None
        if validator is not None and (state.step % train_cfg.eval_every == 0 or at_end):
            validated = ckpt.full_fp32_state_dict(engine, frozen)  # one gather for validation and the save below
            metrics = validator.run(validated, state.step)
            progress.validation(state.step, metrics)
            best = checkpointer.improved(metrics)
        saved = state.step % train_cfg.save_every == 0 or at_end or best is not None
        if saved:
            reason = "final" if state.step == train_cfg.max_steps else "stop_at_step" if at_end else (
                "periodic" if state.step % train_cfg.save_every == 0 else "best")
            checkpointer.save(state, state.counts.reduce(run.device), layout, reason, best=best, weights=validated)
        # The flag is agreed on on logging steps (in the progress all-reduce) and saving steps (one all-reduce of
        # its own), which every rank takes together: a signal takes effect within train.log_every steps.
        if stop_agreed is None and saved:
            stop_agreed = any_rank(stop.requested, run.device)
        if stop_agreed:
            if not saved:
                checkpointer.save(state, state.counts.reduce(run.device), layout, "signal", weights=validated)
            logger.warning("stopped by signal at step %d after saving", state.step)
            break
    counts = state.counts.reduce(run.device)
    if writer is not None:
        writer.close()
    # loss_history covers this launch only: steps first_step + 1 .. step (TensorBoard holds every launch).
    return {"step": state.step, "first_step": first_step, "samples_seen": state.samples_seen,
            "loss_history": progress.loss_history, **counts.as_dict()}


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    config = load_config(args.config, overrides)  # fails here, before any process group, on a bad field
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    if not Path(args.deepspeed_config).is_file():
        raise SystemExit(f"--deepspeed_config {args.deepspeed_config} does not exist")
    # The DeepSpeed config is built here, before any process group: a batch that does not split over the
    # launched ranks or a ZeRO stage that contradicts the training config fails at once, naming both values.
    ds_config = build_deepspeed_config(args.deepspeed_config, config.train, launch_world_size(), bf16_is_fast())
    # The shards (a folder or a URL base: data/remote.py) are checked before launch too: a missing or unreachable
    # dataset.json fails here, naming the path or URL and the reason.
    remote.configure_from(config.data)
    read_dataset_info(config.data.shards, config.data.train_split)
    # A failed rank exits at once: the loader's exit hook stops its workers (mlip_dist.data.loader).
    result = train(config, ds_config, args.resume, args.local_rank)
    summary = Path(config.train.output_dir) / "train_summary.json"
    if dist.get_rank() == 0 and (result["loss_history"] or not summary.is_file()):
        # A launch of a run that had already finished trains nothing: keep the summary of the launch that did.
        ckpt.atomic_write_text(summary, json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
