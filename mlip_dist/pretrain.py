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
import enum
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from mlip_dist.config import MLIPConfig, load_config, to_dict
from mlip_dist.logging_utils import setup_logging
from mlip_dist.model_io import load_tokenizer
from mlip_dist.training import checkpoint as ckpt
from mlip_dist.training.ds_config import build_deepspeed_config, resolve_micro_batch
from mlip_dist.training.schedule import cosine_with_warmup

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
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        logger.warning("received signal %d: will checkpoint and exit after this step", signum)
        self.requested = True


def any_rank(flag: bool, device: torch.device) -> bool:
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


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bf16_is_fast() -> bool:
    """Where ``train.precision: auto`` picks bf16: a GPU with bf16 units. (bf16 also runs on the CPU when asked
    for with ``train.precision: bf16``, but there it is slower than fp32.)"""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def launch_world_size() -> int:
    """The world size the launcher (deepspeed, torchrun, SLURM through torchrun) announces to each rank."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train(config: MLIPConfig, ds_config: dict[str, Any], resume: str, local_rank: int) -> dict[str, Any]:
    import deepspeed

    from mlip_dist.data.loader import build_train_loader, read_dataset_info
    from mlip_dist.training.heatmaps import HeatmapLogger
    from mlip_dist.training.module import MLIPTrainingModule, parameter_groups
    from mlip_dist.training.tensorboard import TrainLogger

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=config.train.collective_timeout_s))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(config.train.seed + rank)

    out_dir = Path(config.train.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(out_dir / "config.json", json.dumps(to_dict(config), indent=2))
    if world_size != launch_world_size():
        raise SystemExit(f"the launcher announced WORLD_SIZE={launch_world_size()} but the process group has "
                         f"{world_size} ranks; the DeepSpeed config was built for the former")
    micro_batch = resolve_micro_batch(config.train, world_size)
    bf16 = ds_config["bf16"]["enabled"]

    module = MLIPTrainingModule(config.model, config.loss, rank=rank, world_size=world_size)
    module.model.set_gradient_checkpointing(config.model.gradient_checkpointing)
    frozen_fp32 = ckpt.frozen_fp32_copies(module)  # before DeepSpeed casts the module to bf16
    train_cfg = config.train

    def lr_lambda(step: int) -> float:
        return cosine_with_warmup(step, warmup_steps=train_cfg.warmup_steps, max_steps=train_cfg.max_steps,
                                  base_lr=train_cfg.lr, min_lr=train_cfg.min_lr) / train_cfg.lr

    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=parameter_groups(module, train_cfg.weight_decay),
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda),
    )

    step, samples_seen = 0, 0
    tag = None
    if resume == "auto":
        tag = ckpt.find_latest(ckpt_dir)
    elif resume != "none":
        tag = resume
    if tag is not None:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if load_path is None:
            raise SystemExit(f"could not load checkpoint {ckpt_dir / tag}")
        step, samples_seen = int(client_state["step"]), int(client_state["samples_seen"])
        ckpt.load_rng(ckpt_dir, tag, rank)
        logger.info("resumed from %s at step %d (%d samples seen)", ckpt_dir / tag, step, samples_seen)

    tokenizer = load_tokenizer(config)
    loader, steps_per_epoch = build_train_loader(
        config.data.shards, config.data.train_split, tokenizer=tokenizer, rank=rank, world_size=world_size,
        micro_batch_size=micro_batch, global_batch_size=train_cfg.global_batch_size,
        image_size=config.model.image.image_size, in_chans=config.model.image.in_chans,
        max_length=config.model.text.max_length, max_sentences=config.model.max_sentences,
        num_workers=config.data.num_workers, shuffle_buffer=config.data.shuffle_buffer,
        resampled=config.data.resampled, augment=config.data.augment, seed=config.data.seed, start_batch=step,
    )
    tb = TrainLogger(out_dir / "tensorboard", config) if rank == 0 else None
    heatmaps = None
    if train_cfg.image_log_every > 0:
        try:
            read_dataset_info(config.data.shards, config.data.val_split)
            heatmaps = HeatmapLogger(config, tokenizer, device, split=config.data.val_split)
        except (FileNotFoundError, KeyError) as err:
            logger.warning("no heat-map images: %s", err)

    def save(reason: str) -> None:
        tag_name = ckpt.tag_for_step(step)
        client_state = {"step": step, "samples_seen": samples_seen, "data_position": step,
                        "steps_per_epoch": steps_per_epoch}
        ckpt.save_training_checkpoint(
            engine, ckpt_dir, step, client_state, {"step": step, "samples_seen": samples_seen, "reason": reason},
            rank=rank, keep_last=train_cfg.keep_last,
            consolidated=train_cfg.save_consolidated, frozen=frozen_fp32,
        )
        logger.info("saved checkpoint %s (%s)", ckpt_dir / tag_name, reason)

    stop = StopRequest()
    first_step = step
    bad_steps = 0
    skipped_steps = 0
    skipped_samples = 0
    history: list[float] = []
    iterator = iter(loader)
    engine.train()
    logger.info("training: %d ranks, micro batch %d, global batch %d, %d steps/epoch, steps %d -> %d, bf16=%s",
                world_size, micro_batch, train_cfg.global_batch_size, steps_per_epoch, step, train_cfg.max_steps, bf16)
    last_step = min(train_cfg.max_steps, train_cfg.stop_at_step or train_cfg.max_steps)
    while step < last_step:
        t_start = time.perf_counter()
        batch = next(iterator)
        skipped_samples += batch.num_skipped
        batch = batch.to(device, dtype=torch.bfloat16 if bf16 else None)
        t_data = time.perf_counter()
        loss, terms = engine(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_forward = time.perf_counter()
        outcome = optimizer_step(engine, loss, device)
        if outcome is StepOutcome.APPLIED:
            bad_steps = 0
        else:
            bad_steps += 1
            skipped_steps += 1
            logger.error("%s at step %d (%d in a row): step skipped", outcome.value, step + 1, bad_steps)
            if bad_steps >= train_cfg.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_steps} steps in a row with a non-finite loss or gradient (last: {outcome.value} at step "
                    f"{step + 1}; train.max_bad_steps={train_cfg.max_bad_steps}); stopping. Lower train.lr, check "
                    f"the data, and resume from the last complete checkpoint in {ckpt_dir}"
                )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_end = time.perf_counter()
        step += 1
        samples_seen += train_cfg.global_batch_size

        if step % train_cfg.log_every == 0 or step == last_step:
            values = terms.scalars()
            stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
            dist.all_reduce(stacked)
            stacked /= world_size
            averaged = dict(zip(values.keys(), stacked.tolist(), strict=True))
            history.append(averaged["loss/total"])
            if tb is not None:
                timing = {"time/data_wait_s": t_data - t_start, "time/forward_s": t_forward - t_data,
                          "time/backward_step_s": t_end - t_forward, "time/step_s": t_end - t_start,
                          "throughput/samples_per_s": train_cfg.global_batch_size / max(t_end - t_start, 1e-9),
                          "memory/peak_gib": memory_gib(device), "data/skipped_samples": skipped_samples,
                          "lr": scheduler.get_last_lr()[0]}
                tb.scalars(step, {**averaged, **timing})
                logger.info("step %d/%d loss %.4f (g %.4f l %.4f r %.4f) lr %.3g %.1f samples/s", step,
                            train_cfg.max_steps, averaged["loss/total"], averaged.get("loss/global", 0.0),
                            averaged.get("loss/local", 0.0), averaged.get("loss/reconstruction", 0.0), timing["lr"],
                            timing["throughput/samples_per_s"])
        if heatmaps is not None and step % train_cfg.image_log_every == 0:
            heatmaps.log(engine.module.model, tb, step)
            engine.train()
        saved = step % train_cfg.save_every == 0 or step == last_step
        if saved:
            save("final" if step == train_cfg.max_steps else "stop_at_step" if step == last_step else "periodic")
        if any_rank(stop.requested, device):
            if not saved:
                save("signal")
            logger.warning("stopped by signal at step %d after saving", step)
            break
    if tb is not None:
        tb.close()
    # loss_history covers this launch only: steps first_step + 1 .. step (TensorBoard holds every launch).
    return {"step": step, "first_step": first_step, "samples_seen": samples_seen, "loss_history": history,
            "skipped_samples": skipped_samples, "skipped_steps": skipped_steps}


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
