#!/usr/bin/env python
"""One-GPU benchmark: bf16 correctness against a float64 reference, and training-step throughput / MFU.

    python tools/bench_gpu.py [--preset paper] [--batch 128] [--tokens 128] [--steps 10]
    python tools/bench_gpu.py --preset tiny --batch 4 --steps 2 --device cpu   # a quick dry run

Two parts, each comparing its settings side by side in one process on one device:

``precision``  The same randomly initialised ``MLIPTrainingModule`` (model + composite loss, METHOD.md
               Losses 1-4, dropout off) on the same batch and the same patch mask in float64 (the
               reference), float32 (TF32 off), bf16 autocast over float32 weights, and bf16 weights and
               images (what DeepSpeed's ``bf16`` mode runs). Printed per setting: the relative error of the
               total loss and of each term, and for the parameter gradients the cosine similarity and the
               relative error ``|g - g64| / |g64|`` over all parameters and per part of the model.
``throughput`` Forward + backward of one training step (the optimizer step is left out; its cost does not
               grow with the batch) at ``--batch`` images, for: float32, float32 with TF32 matmuls, bf16
               autocast, bf16 weights, bf16 weights + gradient checkpointing, bf16 weights without the OT
               loss. Printed: median step time over ``--steps`` timed steps after warm-up, images/s, peak
               memory, achieved TFLOP/s and MFU. FLOPs are counted once by ``torch.utils.flop_counter``
               (the same model FLOPs for every setting: checkpointing's recomputation is not counted, so
               its MFU is model FLOPs utilisation) and divided by a bf16 peak: the datasheet's dense
               989 TFLOP/s (H100/H200 SXM; ``--peak-tflops``) and the rate of an 8192^3 bf16 matmul
               measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_pretrain import step_flops, synthetic_batch  # noqa: E402

from mlip_dist.config import LossConfig, ModelConfig  # noqa: E402
from mlip_dist.data.batch import MLIPBatch  # noqa: E402
from mlip_dist.models.presets import get_preset  # noqa: E402
from mlip_dist.training.module import MLIPTrainingModule  # noqa: E402

TERMS = ("total", "global_loss", "local_loss", "reconstruction_loss")


@dataclass(frozen=True)
class Precision:
    name: str
    weights: torch.dtype
    autocast: bool = False
    tf32: bool = False


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def run_step(module: MLIPTrainingModule, batch: MLIPBatch, precision: Precision, device: torch.device):
    """Forward + backward of one step; returns the loss terms (the step's RNG is the caller's)."""
    set_tf32(precision.tf32)
    images_dtype = precision.weights if not precision.autocast else torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.autocast):
        total, terms = module(replace(batch, images=batch.images.to(images_dtype)))
    total.backward()
    return terms


def model_part(name: str) -> str:
    """Group parameter names into parts: the two encoders, the decoder, the heads and the loss."""
    parts = name.split(".")
    if parts[0] == "model" and parts[1] in ("image_encoder", "text_encoder", "decoder"):
        return parts[1]
    return "heads + loss"  # the projections, the logit scale, the learned-integrity head


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().flatten() for n, p in module.named_parameters() if p.grad is not None}


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per model part and 'all': (cosine similarity, relative error) of the gradients against the reference."""
    groups: dict[str, list[str]] = {"all": list(reference)}
    for name in reference:
        groups.setdefault(model_part(name), []).append(name)
    out = {}
    for group, names in groups.items():
        g = torch.cat([grads[n] for n in names])
        r = torch.cat([reference[n] for n in names])
        cosine = float(g @ r / (g.norm() * r.norm()).clamp_min(1e-300))
        out[group] = (cosine, float((g - r).norm() / r.norm().clamp_min(1e-300)))
    return out


@dataclass
class PrecisionResult:
    terms: dict[str, float]  # the loss terms (reference) or their relative errors against it (others)
    gradients: dict[str, tuple[float, float]]  # per model part: (cosine, relative error) vs the reference


def compare_precisions(model_cfg: ModelConfig, batch: MLIPBatch, device: torch.device,
                       seed: int) -> dict[str, PrecisionResult]:
    """One step of the same module, batch and patch mask per setting, each against the float64 run."""
    torch.manual_seed(seed)
    base = MLIPTrainingModule(model_cfg, LossConfig(), rank=0, world_size=1).train()
    settings = [
        Precision("float64 (reference)", torch.float64),
        Precision("float32", torch.float32),
        Precision("bf16 autocast", torch.float32, autocast=True),
        Precision("bf16 weights", torch.bfloat16),
    ]
    results: dict[str, PrecisionResult] = {}
    terms_ref: dict[str, float] = {}
    grads_ref: dict[str, torch.Tensor] = {}
    for setting in settings:
        module = copy.deepcopy(base).to(device=device, dtype=setting.weights)
        torch.manual_seed(seed)  # the patch mask is drawn from the global generator, in float32 for every dtype
        terms = run_step(module, batch.to(device), setting, device)
        values = {t: float(getattr(terms, t).detach().double()) for t in TERMS}
        grads = gradients(module)
        del module
        if not terms_ref:
            terms_ref, grads_ref = values, grads
            results[setting.name] = PrecisionResult(values, {})
            continue
        errors = {t: abs(values[t] - terms_ref[t]) / max(abs(terms_ref[t]), 1e-12) for t in TERMS}
        results[setting.name] = PrecisionResult(errors, compare(grads, grads_ref))
    set_tf32(False)
    return results


def part_precision(model_cfg: ModelConfig, batch: MLIPBatch, device: torch.device, seed: int) -> None:
    print(f"precision: {len(batch)} images, {batch.input_ids.shape[1]} tokens, same weights, batch and patch mask")
    for name, result in compare_precisions(model_cfg, batch, device, seed).items():
        if not result.gradients:
            print("  " + name + ": " + ", ".join(f"{t} {v:.6f}" for t, v in result.terms.items()))
            continue
        print(f"  {name}: loss relative error " + ", ".join(f"{t} {v:.1e}" for t, v in result.terms.items()))
        for group, (cosine, rel) in result.gradients.items():
            print(f"      gradients {group:<14} cosine {cosine:.6f}  relative error {rel:.2e}")


def time_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> list[float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def matmul_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = time_steps(lambda: a @ b, repeats, 3, device)
    return 2 * size**3 / statistics.median(times) / 1e12


def part_throughput(model_cfg: ModelConfig, batch: MLIPBatch, device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    base = MLIPTrainingModule(model_cfg, LossConfig(), rank=0, world_size=1).train()
    no_ot = MLIPTrainingModule(model_cfg, LossConfig(lambda_local=0.0), rank=0, world_size=1).train()
    no_ot.load_state_dict(base.state_dict())
    batch = batch.to(device)
    flops = step_flops(copy.deepcopy(base).to(device), batch)
    flops_no_ot = step_flops(copy.deepcopy(no_ot).to(device), batch)
    measured_peak = matmul_tflops(device, args.matmul_size) if device.type == "cuda" else float("nan")
    print(f"throughput: {len(batch)} images, {batch.input_ids.shape[1]} tokens; one step's forward + backward "
          f"{flops / 1e12:.2f} TFLOP ({flops / len(batch) / 1e9:.1f} GFLOP/image; without OT "
          f"{flops_no_ot / 1e12:.2f} TFLOP); bf16 peak: datasheet {args.peak_tflops:.0f} TFLOP/s, "
          f"measured {args.matmul_size}^3 matmul {measured_peak:.0f} TFLOP/s")
    settings = [
        ("float32", base, Precision("fp32", torch.float32), False),
        ("float32 + TF32", base, Precision("tf32", torch.float32, tf32=True), False),
        ("bf16 autocast", base, Precision("autocast", torch.float32, autocast=True), False),
        ("bf16 weights", base, Precision("bf16", torch.bfloat16), False),
        ("bf16 weights + checkpointing", base, Precision("bf16", torch.bfloat16), True),
        ("bf16 weights, OT off", no_ot, Precision("bf16", torch.bfloat16), False),
    ]
    reference_time = None
    for name, source, precision, checkpointing in settings:
        module = copy.deepcopy(source).to(device=device, dtype=precision.weights)
        module.model.set_gradient_checkpointing(checkpointing)

        def step(module: MLIPTrainingModule = module, precision: Precision = precision) -> None:
            module.zero_grad(set_to_none=True)
            run_step(module, batch, precision, device)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step, args.steps, args.warmup, device)
        median = statistics.median(times)
        reference_time = reference_time or median
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        step_flop = flops_no_ot if source is no_ot else flops
        achieved = step_flop / median / 1e12
        print(f"  {name:<30} {median * 1e3:8.1f} ms/step ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})  "
              f"{len(batch) / median:8.1f} images/s  {peak_gib:6.1f} GiB peak  {achieved:6.1f} TFLOP/s  "
              f"MFU {achieved / args.peak_tflops:6.1%} of datasheet, {achieved / measured_peak:6.1%} of measured  "
              f"time vs float32 {median / reference_time:.2f}x")
        del module, step
    set_tf32(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("precision", "throughput", "all"), default="all")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch", type=int, default=128, help="throughput: images per step (METHOD.md: 512 on 4 GPUs)")
    parser.add_argument("--precision-batch", type=int, default=16, help="precision: images (float64 is slow)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="throughput: timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 peak of the GPU")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model_cfg = get_preset(args.preset)
    model_cfg = replace(model_cfg, text=replace(model_cfg.text, dropout=0.0, path=None))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset} preset on {name}, torch {torch.__version__}")
    if args.part in ("precision", "all"):
        part_precision(model_cfg, synthetic_batch(model_cfg, args.precision_batch, args.tokens, args.sentences),
                       device, args.seed)
    if args.part in ("throughput", "all"):
        part_throughput(model_cfg, synthetic_batch(model_cfg, args.batch, args.tokens, args.sentences), device, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
