"""Is the training loader ever the bottleneck? Loader samples/s per worker vs trainer samples/s.

Measured in one invocation, back to back, on the same shards and batch size:

* the loader: ``mlip_dist.data.loader.build_train_loader`` (rank 0 of 1) with 0, 1 and 2 worker
  processes, tokenizing with the ``small`` preset's MiniLM tokenizer and augmenting to the
  ``small`` image size (128 px); samples/s over ``--batches`` micro-batches after ``--warmup``;
* the trainer: one process, ``MLIPTrainingModule`` of the ``small`` preset (model + composite loss
  with its defaults) forward + backward + ``torch.optim.AdamW`` step on a real loader batch,
  ``--threads`` torch threads, no DeepSpeed.

Prints samples/s for each, samples/s per loader worker, and the ratios loader/trainer (must be > 1:
the trainer never waits) and per-worker/trainer (> 1 means one loader core feeds one trainer core).

    python tools/bench_loader.py                      # synthetic shards are built in a temp folder
    python tools/bench_loader.py --stored-size 512          # shards stored like make_shards' default
    python tools/bench_loader.py --shards /tmp/bench4/shards --batch 16 --workers 0,1,2
    python tools/bench_loader.py --image-size 224 --stored-size 512 --workers 1 --steps 0 --float-batches
        # per-worker capacity at the paper preset's 224 px (docs/SCALING.md: workers per GPU), compact batches
        # (one uint8 channel, normalised on the device) against the old normalised 3-channel float32 ones
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

REPO = Path(__file__).resolve().parent.parent


def build_synthetic_shards(out: Path, studies: int, image_size: int, seed: int) -> Path:
    """Synthetic MIMIC-CXR (JPG release) packed with the users' own commands; returns the shard folder."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    raw, shards = out / "raw", out / "shards"
    for cmd in (
        ["tools/make_synthetic.py", "--out", str(raw), "--studies", str(studies), "--seed", str(seed),
         "--format", "jpg", "--image-size", str(2 * image_size), "--no-eval-sets", "--no-progress"],
        ["tools/make_shards.py", "--root", str(raw), "--out", str(shards), "--size", str(image_size),
         "--shard-size", "16", "--workers", "1", "--no-progress"],
    ):
        result = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return shards


def loader_rate(shards: Path, tokenizer, model_cfg, batch: int, workers: int, batches: int, warmup: int,
                max_sentences: int, image_size: int | None = None,
                compact: bool = True) -> tuple[float, float, int]:
    """(samples/s over ``batches`` micro-batches after ``warmup``, seconds to the first batch, image bytes per
    batch as the workers ship it)."""
    from mlip_dist.data.loader import build_train_loader

    loader, _ = build_train_loader(
        shards, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=batch,
        global_batch_size=batch, image_size=image_size or model_cfg.image.image_size,
        in_chans=model_cfg.image.in_chans, max_length=model_cfg.text.max_length, max_sentences=max_sentences,
        num_workers=workers, shuffle_buffer=64, resampled=False, augment=True, seed=0, compact=compact,
    )
    iterator = iter(loader)
    start = time.perf_counter()
    images = next(iterator).images
    first = time.perf_counter() - start
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    del iterator, loader  # shuts the worker processes down before the next measurement
    return batches * batch / elapsed, first, images.element_size() * images.numel()


def trainer_rate(shards: Path, tokenizer, model_cfg, batch: int, steps: int, max_sentences: int) -> tuple[float, list[float]]:
    """(samples/s of forward + backward + AdamW step, per-step seconds) of the ``small`` training module."""
    from mlip_dist.config import LossConfig
    from mlip_dist.data.loader import build_train_loader
    from mlip_dist.training.module import MLIPTrainingModule, parameter_groups

    loader, _ = build_train_loader(
        shards, "train", tokenizer=tokenizer, rank=0, world_size=1, micro_batch_size=batch, global_batch_size=batch,
        image_size=model_cfg.image.image_size, in_chans=model_cfg.image.in_chans,
        max_length=model_cfg.text.max_length, max_sentences=max_sentences, num_workers=0, shuffle_buffer=64, seed=0,
    )
    batches = iter(loader)
    data = [next(batches).to("cpu") for _ in range(2)]  # compact pixels normalised, as the trainer does
    torch.manual_seed(0)
    module = MLIPTrainingModule(model_cfg, LossConfig(), rank=0, world_size=1)
    module.train()
    optimizer = torch.optim.AdamW(parameter_groups(module, 0.05), lr=1e-4)
    times = []
    for step in range(steps + 1):  # the first step (lazy init, optimizer state allocation) is not timed
        start = time.perf_counter()
        loss, _ = module(data[step % 2])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times), times


def add_shard_arguments(parser: argparse.ArgumentParser, studies: int) -> None:
    """The loader benchmarks' shared options: the shards to read (or how many synthetic studies to build)."""
    parser.add_argument("--shards", type=Path, help="shard folder (dataset.json); default: build synthetic ones")
    parser.add_argument("--studies", type=int, default=studies, help="synthetic studies when --shards is not given")
    parser.add_argument("--stored-size", type=int, default=None,
                        help="shorter side of the synthetic shards' images (default: the preset's 128; "
                             "make_shards' own default for real data is 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")


@contextmanager
def small_preset_shards(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Any, Any, Path, Path]]:
    """(small preset config, its tokenizer, the shards, a scratch folder): ``args.shards`` or synthetic shards
    built in the scratch folder, which is removed afterwards. Sets the offline flags and ``args.threads``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from mlip_dist.models.presets import small
    from mlip_dist.text.tokenize import load_tokenizer

    model_cfg = small()
    tokenizer = load_tokenizer(model_cfg.text)
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        shards = args.shards or build_synthetic_shards(
            Path(scratch), args.studies, args.stored_size or model_cfg.image.image_size, 0)
        yield model_cfg, tokenizer, shards, Path(scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard_arguments(parser, studies=200)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch for both loader and trainer")
    parser.add_argument("--workers", default="0,1,2", help="loader worker counts to measure")
    parser.add_argument("--batches", type=int, default=40, help="timed loader micro-batches per worker count")
    parser.add_argument("--warmup", type=int, default=2, help="untimed loader micro-batches after the first")
    parser.add_argument("--steps", type=int, default=3, help="timed trainer steps (after one untimed); 0: no trainer")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training image size (default: the small preset's 128; the paper preset's is 224)")
    parser.add_argument("--float-batches", action="store_true",
                        help="also time the loader shipping normalised 3-channel float32 (the old batches)")
    args = parser.parse_args()

    with small_preset_shards(args, "bench_loader_") as (model_cfg, tokenizer, shards, _):
        image_size = args.image_size or model_cfg.image.image_size
        print(f"shards {shards}, small preset tokenizer: {image_size} px, max_length {model_cfg.text.max_length}, "
              f"batch {args.batch}, trainer torch threads {args.threads}, cpu count {os.cpu_count()}, "
              f"load average {tuple(round(x, 2) for x in os.getloadavg())}")
        train_sps = float("nan")
        if args.steps > 0:
            train_sps, step_times = trainer_rate(shards, tokenizer, model_cfg, args.batch, args.steps,
                                                 model_cfg.max_sentences)
            print(f"trainer (fwd+bwd+AdamW, 1 process, {model_cfg.image.image_size} px): {train_sps:7.1f} samples/s  "
                  f"(step s: {', '.join(f'{t:.2f}' for t in step_times)})")
        for workers in (int(w) for w in args.workers.split(",")):
            rates = {}
            for compact in (True, False) if args.float_batches else (True,):
                sps, first, nbytes = loader_rate(shards, tokenizer, model_cfg, args.batch, workers, args.batches,
                                                 args.warmup, model_cfg.max_sentences, image_size, compact)
                rates[compact] = sps
                per_worker = sps / max(1, workers)
                kind = "compact uint8 1-channel" if compact else "float32 3-channel     "
                print(f"loader workers={workers}, {kind}: {sps:7.1f} samples/s, {per_worker:7.1f} per worker "
                      f"(first batch {first:.2f} s, images {nbytes / 2**20:.2f} MiB/batch)"
                      + (f" | loader/trainer {sps / train_sps:6.1f}x, per-worker/trainer {per_worker / train_sps:6.1f}x"
                         if args.steps > 0 and image_size == model_cfg.image.image_size else ""))
            if len(rates) == 2:
                print(f"  compact/float loader rate, workers={workers}: {rates[True] / rates[False]:.2f}x")
        print(f"load average after {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
