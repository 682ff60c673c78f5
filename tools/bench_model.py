#!/usr/bin/env python
"""Benchmark the masked image encoder: patch masking speed-up and gradient checkpointing memory.

    OMP_NUM_THREADS=1 python tools/bench_model.py [--model vit_small_patch16_224 --image-size 224 --batch 16]

Side by side in one process, one training step = forward + backward of ``ImageEncoder`` (train
mode) with a scalar loss over its global embedding and visible patch tokens:

1. masking: ``mask_ratio`` 0.5 vs 0 (no masking). Target: time ratio <= 0.6.
2. gradient checkpointing (per block, ``torch.utils.checkpoint``, non-reentrant) vs none, both
   unmasked. Target: peak memory ratio <= 0.5 at time ratio <= 1.4.
3. the conv patch stem (``model.image.stem: conv``, ``--stem-width``) vs timm's linear patch embedding,
   same ViT, at mask 0 and 0.5: what the stem costs (what it buys is measured by the study, RESULTS.md).

Timing: settings are interleaved within each repeat (so a load change on a shared CPU hits all of
them alike); the median over repeats is reported, after one warm-up step per setting.

Memory: bytes allocated by torch on the CPU, from ``torch.profiler`` (``profile_memory=True``):
every allocation and free is a ``[memory]`` event with a signed ``nbytes``, and the running sum in
time order is the live memory. Reported: (a) the autograd graph, i.e. the net bytes still held
after the forward (tensors saved for backward plus the tiny outputs): the quantity gradient
checkpointing reduces and the one the target refers to; (b) the peak during forward + backward,
which also contains the parameter gradients (equal in both settings, and the larger part for
small inputs). Gradients are set to None before each measurement, so nothing allocated earlier is
freed inside it. Unlike process RSS this does not depend on the C allocator returning memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mlip_dist.config import ImageEncoderConfig, PatchStem
from mlip_dist.models.image_encoder import ImageEncoder


def step_loss(encoder: ImageEncoder, images: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    out = encoder(images, mask_ratio=mask_ratio)
    return out.global_embedding.square().mean() + out.patch_tokens.square().mean()


def _live_bytes(prof: profile) -> tuple[int, int]:
    """(net bytes still allocated at the end, peak live bytes) from the profiler's memory events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == DeviceType.CPU:
            live += event.nbytes()  # type: ignore[union-attr]
            peak = max(peak, live)
    return live, peak


def measure_memory(encoder: ImageEncoder, images: torch.Tensor, mask_ratio: float) -> tuple[int, int]:
    """(bytes the autograd graph holds after the forward, peak bytes during forward + backward).

    Gradients are set to None before each measurement, so no pre-existing block is freed inside it.
    """
    encoder.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step_loss(encoder, images, mask_ratio)
    graph_bytes, _ = _live_bytes(prof)
    loss.backward()
    del loss
    encoder.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_loss(encoder, images, mask_ratio).backward()
    _, peak = _live_bytes(prof)
    return graph_bytes, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=None, help="ViT width override (e.g. 128, the study's)")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--stem-width", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = ImageEncoderConfig(name=args.model, image_size=args.image_size, patch_size=args.patch_size,
                                width=args.width, depth=args.depth, num_heads=args.heads)
    encoder = ImageEncoder(config).train()
    conv_encoder = ImageEncoder(dataclasses.replace(config, stem=PatchStem.CONV, stem_width=args.stem_width)).train()
    images = torch.randn(args.batch, config.in_chans, args.image_size, args.image_size)
    n_params = sum(p.numel() for p in encoder.parameters()) / 1e6
    print(
        f"{args.model} {args.image_size}px patch {args.patch_size} ({encoder.num_patches} patches, "
        f"{n_params:.1f}M params), batch {args.batch}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}"
    )

    def run(mask_ratio: float, checkpointing: bool, model: ImageEncoder = encoder) -> Callable[[], None]:
        def step() -> None:
            model.set_gradient_checkpointing(checkpointing)
            step_loss(model, images, mask_ratio).backward()

        return step

    settings = {
        "mask 0.0": run(0.0, False),
        "mask 0.5": run(0.5, False),
        "mask 0.0 + checkpointing": run(0.0, True),
        "conv stem, mask 0.0": run(0.0, False, conv_encoder),
        "conv stem, mask 0.5": run(0.5, False, conv_encoder),
    }
    times: dict[str, list[float]] = {name: [] for name in settings}

    def clear_gradients() -> None:
        for model in (encoder, conv_encoder):
            model.zero_grad(set_to_none=True)

    for step in settings.values():
        clear_gradients()
        step()  # warm-up
    for _ in range(args.repeats):
        for name, step in settings.items():
            clear_gradients()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"  {name:<26} median {median[name]:.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")

    encoder.set_gradient_checkpointing(False)
    graph_plain, peak_plain = measure_memory(encoder, images, 0.0)
    encoder.set_gradient_checkpointing(True)
    graph_ckpt, peak_ckpt = measure_memory(encoder, images, 0.0)
    mask_ratio_time = median["mask 0.5"] / median["mask 0.0"]
    ckpt_time = median["mask 0.0 + checkpointing"] / median["mask 0.0"]
    ckpt_memory = graph_ckpt / graph_plain
    mib = 2**20
    print(
        f"  autograd graph after forward: {graph_plain / mib:.1f} MiB plain, {graph_ckpt / mib:.1f} MiB checkpointed"
    )
    print(
        f"  peak during forward+backward (incl. {n_params * 4:.0f} MB of fp32 parameter gradients): "
        f"{peak_plain / mib:.1f} MiB plain, {peak_ckpt / mib:.1f} MiB checkpointed "
        f"({peak_ckpt / peak_plain:.2f}x)"
    )
    print(f"(1) masking 0.5 vs none: time ratio {mask_ratio_time:.2f}x (target <= 0.60x)")
    print(
        f"(2) gradient checkpointing vs none: autograd graph memory ratio {ckpt_memory:.2f}x (target <= 0.50x), "
        f"time ratio {ckpt_time:.2f}x (target <= 1.40x)"
    )
    conv_params = sum(p.numel() for p in conv_encoder.vit.patch_embed.parameters()) / 1e6
    print(f"(3) conv patch stem (width {args.stem_width}, {conv_params:.2f}M params) vs linear: time ratio "
          f"{median['conv stem, mask 0.0'] / median['mask 0.0']:.2f}x unmasked, "
          f"{median['conv stem, mask 0.5'] / median['mask 0.5']:.2f}x at mask 0.5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
