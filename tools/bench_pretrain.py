"""Training benchmarks: 1- vs 2-rank CPU training, ZeRO memory per rank, OT share of a step.

Three parts, each measuring its competing settings back to back in one invocation:

``run``     ``mlip_dist/pretrain.py`` under ``torchrun`` with 1 and then 2 ranks (``small`` preset,
            same micro-batch per rank, ZeRO-2, fp32). Reads the TensorBoard scalars
            ``time/data_wait_s``, ``time/forward_s``, ``time/backward_step_s``,
            ``throughput/samples_per_s`` (warm-up steps skipped) and prints medians, the 2-rank/1-rank
            throughput ratio, and the FLOPs of one rank's step (``torch.utils.flop_counter``) against a
            matmul baseline measured in the same invocation, i.e. what a pure-FLOP cost model predicts.
``memory``  per ZeRO stage (``ds_configs/zero{1,2,3}.json`` through ``build_deepspeed_config``), one
            ``torchrun`` of 2 ranks builds the engine exactly as the trainer does, runs one step on a
            synthetic batch and reports per rank: parameter elements held (ZeRO-3: ``ds_tensor``
            partitions), gradient elements held at the optimizer step, the fp32 master partition the
            optimizer updates, and the optimizer state bytes (``engine.optimizer.optimizer.state``).
``ot``      one rank's local OT loss (``local_ot_partial``: local images x gathered reports) forward +
            backward at paper shapes against the ``paper`` model forward + backward (other losses on,
            OT off) of a few images, extrapolated linearly to the local batch; prints the OT share.

    python tools/bench_pretrain.py --part run --shards /tmp/bench4/shards
    python tools/bench_pretrain.py --part memory --preset paper
    python tools/bench_pretrain.py --part ot
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from mlip_dist.launching import launch_environment

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "mlip_dist" / "pretrain.py"
TIME_TAGS = ("time/data_wait_s", "time/forward_s", "time/backward_step_s", "time/step_s", "throughput/samples_per_s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 900) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(script), *args]
    result = subprocess.run(cmd, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result.stdout + result.stderr


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul rate of this process (same threads as the caller)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def synthetic_batch(model_cfg, batch: int, tokens: int, sentences: int, seed: int = 0):
    """Random images and token ids with ``sentences`` equal spans per report (shapes only matter)."""
    from mlip_dist.data.batch import MLIPBatch

    g = torch.Generator().manual_seed(seed)
    size, chans = model_cfg.image.image_size, model_cfg.image.in_chans
    slots = model_cfg.max_sentences
    sentences = min(sentences, slots)
    width = max(1, (tokens - 2) // sentences)
    spans = torch.zeros(batch, slots, 2, dtype=torch.long)
    for s in range(sentences):
        spans[:, s, 0], spans[:, s, 1] = 1 + s * width, 1 + (s + 1) * width
    mask = torch.zeros(batch, slots, dtype=torch.bool)
    mask[:, :sentences] = True
    return MLIPBatch(
        images=torch.randn(batch, chans, size, size, generator=g),
        input_ids=torch.randint(1000, min(model_cfg.text.vocab_size, 20000), (batch, tokens), generator=g),
        attention_mask=torch.ones(batch, tokens, dtype=torch.long),
        sentence_spans=spans,
        sentence_mask=mask,
    )


# ----------------------------------------------------------------------------------------------- run


def read_scalars(tb_dir: Path, skip: int) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.value for e in events.Scalars(tag) if e.step > skip] for tag in TIME_TAGS}


def step_flops(module: torch.nn.Module, batch) -> float:
    """FLOPs of one forward + backward of ``module`` (torch.utils.flop_counter: matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss, _ = module(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def part_run(args: argparse.Namespace) -> None:
    import yaml

    from mlip_dist.models.presets import get_preset

    shards = args.shards
    scratch = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    if shards is None:
        sys.path.insert(0, str(REPO / "tools"))
        from bench_loader import build_synthetic_shards

        shards = build_synthetic_shards(scratch / "data", 200, get_preset(args.preset).image.image_size, 0)
    results = {}
    for ranks in (1, 2):
        out = scratch / f"run{ranks}"
        config = {
            "preset": args.preset,
            "data": {"shards": str(shards), "num_workers": args.loader_workers, "shuffle_buffer": 64},
            "train": {"output_dir": str(out), "global_batch_size": args.micro * ranks, "max_steps": args.steps,
                      "warmup_steps": 2, "log_every": 1, "image_log_every": 0, "save_every": 10**6,
                      "save_consolidated": False, "precision": "fp32", "zero_stage": 2},
        }
        path = scratch / f"config{ranks}.yaml"
        path.write_text(yaml.safe_dump(config))
        start = time.perf_counter()
        torchrun(ranks, PRETRAIN, "--config", str(path), "--deepspeed_config", str(REPO / "ds_configs" / "zero2.json"),
                 "--resume", "none")
        wall = time.perf_counter() - start
        scalars = read_scalars(out / "tensorboard", args.skip)
        med = {tag: statistics.median(values) for tag, values in scalars.items()}
        results[ranks] = med
        print(f"{ranks} rank(s), micro {args.micro}, global {args.micro * ranks}, {args.steps} steps "
              f"({len(scalars['time/step_s'])} timed after {args.skip} skipped), wall {wall:.0f} s incl. start-up")
        print(f"  median step {med['time/step_s']:.3f} s = data_wait {med['time/data_wait_s']:.3f} + forward "
              f"{med['time/forward_s']:.3f} + backward_step {med['time/backward_step_s']:.3f}; "
              f"{med['throughput/samples_per_s']:.2f} samples/s (median of per-step values)")
    ratio = results[2]["throughput/samples_per_s"] / results[1]["throughput/samples_per_s"]
    print(f"2-rank / 1-rank throughput: {ratio:.2f}x (ideal 2.00x with one free core per rank)")

    torch.set_num_threads(1)
    from mlip_dist.data.loader import build_train_loader
    from mlip_dist.text.tokenize import load_tokenizer

    model_cfg = get_preset(args.preset)
    loader, _ = build_train_loader(
        shards, "train", tokenizer=load_tokenizer(model_cfg.text), rank=0, world_size=1, micro_batch_size=args.micro,
        global_batch_size=args.micro, image_size=model_cfg.image.image_size, in_chans=model_cfg.image.in_chans,
        max_length=model_cfg.text.max_length, max_sentences=model_cfg.max_sentences, num_workers=0, seed=0,
    )
    batch = next(iter(loader)).to("cpu")  # a real batch (normalised): FLOPs depend on the padded token length
    from mlip_dist.config import LossConfig
    from mlip_dist.training.module import MLIPTrainingModule

    flops = step_flops(MLIPTrainingModule(model_cfg, LossConfig(), rank=0, world_size=1), batch)
    rate = matmul_gflops()
    compute = results[1]["time/forward_s"] + results[1]["time/backward_step_s"]
    tokens, sentences = batch.input_ids.shape[1], float(batch.sentence_mask.sum(1).float().mean())
    print(f"one rank's fwd+bwd at micro {args.micro} (loader batch: {tokens} tokens, {sentences:.1f} sentences): "
          f"{flops / 1e9:.1f} GFLOP; matmul baseline {rate:.1f} GFLOP/s (1 thread) -> FLOP model predicts "
          f"{flops / rate / 1e9:.2f} s, 1-rank measured forward+backward_step {compute:.2f} s "
          f"(achieved {flops / compute / 1e9:.1f} GFLOP/s, {flops / compute / 1e9 / rate:.0%} of the baseline)")
    print(f"load average {tuple(round(x, 2) for x in os.getloadavg())}")


# -------------------------------------------------------------------------------------------- memory


def rss_mib() -> tuple[float, float]:
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args: argparse.Namespace) -> None:
    """Run under torchrun: build the engine for one ZeRO stage, one step, report what one rank holds."""
    import deepspeed
    import timm  # noqa: F401  - ZeRO-3 needs timm imported before its parameter conversion
    import torch.distributed as dist

    from mlip_dist.config import LossConfig, TrainConfig
    from mlip_dist.models.presets import get_preset
    from mlip_dist.training.ds_config import build_deepspeed_config
    from mlip_dist.training.engine import build_optimizer
    from mlip_dist.training.module import MLIPTrainingModule, parameter_groups

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    stage = args.stage
    train = TrainConfig(global_batch_size=args.micro * world, zero_stage=stage, precision="fp32")
    ds_config = build_deepspeed_config(REPO / "ds_configs" / f"zero{stage}.json", train, world, False)
    model_cfg = get_preset(args.preset)
    module = MLIPTrainingModule(model_cfg, LossConfig(), rank=rank, world_size=world)
    # deepspeed is imported before the model is built, so the image encoder registers its ZeRO-3
    # external parameters itself (mlip_dist.models.image_encoder), as in the trainer.
    full = sum(p.numel() for p in module.parameters())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(parameter_groups(module, 0.05), train),
                                           config=ds_config)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    zero_optimizer = engine.optimizer
    inner = zero_optimizer.optimizer  # the torch AdamW that ZeRO drives on this rank's partition
    # ZeRO's fp32 master partitions (one flat tensor per parameter group): what AdamW updates.
    master_groups = (getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
                     or zero_optimizer.fp32_partitioned_groups_flat)
    seen = {"grad_partition": 0, "model_grads": 0}
    original_step = inner.step

    def counting_step(*a, **kw):
        # ZeRO calls AdamW once per group; by then every group's reduced gradient partition is attached.
        seen["grad_partition"] = max(seen["grad_partition"],
                                     sum(t.grad.numel() for t in master_groups if t.grad is not None))
        seen["model_grads"] = max(seen["model_grads"],
                                  sum(p.grad.numel() for p in module.parameters() if p.grad is not None))
        return original_step(*a, **kw)

    inner.step = counting_step
    batch = synthetic_batch(model_cfg, args.micro, args.tokens, args.sentences, seed=rank)
    loss, _ = engine(batch)
    engine.backward(loss)
    engine.step()
    master = sum(t.numel() for t in master_groups)
    state_bytes = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    rss, peak = rss_mib()
    report = {"rank": rank, "stage": stage, "full_params": full, "params_held": held,
              "grad_partition": seen["grad_partition"], "model_grads": seen["model_grads"],
              "master_partition": master, "optimizer_state_bytes": state_bytes, "rss_mib": rss, "peak_rss_mib": peak}
    print("MEMORY " + json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def part_memory(args: argparse.Namespace) -> None:
    mib = 2**20
    print(f"preset {args.preset}, 2 ranks, fp32, micro {args.micro} (synthetic batch, {args.tokens} tokens); "
          "elements held per rank x 4 bytes; grads = at the moment ZeRO calls AdamW.step")
    print(f"{'stage':>5} {'rank':>4} {'params MiB':>11} {'grads MiB':>10} {'(full .grad)':>12} {'fp32 master':>11} "
          f"{'Adam state':>10} {'sum MiB':>8} {'RSS MiB':>8} {'peak RSS':>8}")
    sums = {}
    for stage in (int(s) for s in args.stages.split(",")):
        output = torchrun(2, Path(__file__), "--memory-worker", "--stage", str(stage), "--preset", args.preset,
                          "--micro", str(args.micro), "--tokens", str(args.tokens), "--sentences", str(args.sentences))
        for line in output.splitlines():
            if "MEMORY " not in line:
                continue
            r = json.loads(line.split("MEMORY ", 1)[1])
            grads = r["grad_partition"] * 4 / mib
            full_grads = r["model_grads"] * 4 / mib
            total = (r["params_held"] * 4 + r["grad_partition"] * 4 + r["model_grads"] * 4 + r["master_partition"] * 4
                     + r["optimizer_state_bytes"]) / mib
            sums.setdefault(stage, []).append(total)
            print(f"{stage:>5} {r['rank']:>4} {r['params_held'] * 4 / mib:>11.1f} {grads:>10.1f} {full_grads:>12.1f} "
                  f"{r['master_partition'] * 4 / mib:>11.1f} {r['optimizer_state_bytes'] / mib:>10.1f} {total:>8.1f} "
                  f"{r['rss_mib']:>8.0f} {r['peak_rss_mib']:>8.0f}")
            full_params = r["full_params"]
    print(f"full model: {full_params / 1e6:.1f} M parameters = {full_params * 4 / mib:.1f} MiB fp32")
    if 1 in sums and 3 in sums:
        print(f"ZeRO-3 / ZeRO-1 bytes held per rank (mean over ranks): "
              f"{statistics.mean(sums[3]) / statistics.mean(sums[1]):.2f}x")


# ------------------------------------------------------------------------------------------------ ot


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def part_ot(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from mlip_dist.config import LossConfig
    from mlip_dist.losses.local_ot import local_ot_partial
    from mlip_dist.models.image_encoder import num_visible_patches
    from mlip_dist.models.presets import paper
    from mlip_dist.training.module import MLIPTrainingModule

    torch.set_num_threads(args.threads)
    model_cfg = paper()
    n, total, dim, slots = args.local_images, args.reports, model_cfg.embed_dim, model_cfg.max_sentences
    grid = model_cfg.image.image_size // model_cfg.image.patch_size
    kv = num_visible_patches(grid * grid, model_cfg.image.mask_ratio)
    loss_cfg = LossConfig()
    print(f"paper preset, one rank: {n} local images x {total} gathered reports, {kv} visible patches, "
          f"{slots} sentence slots, d {dim}, eps {loss_cfg.ot_epsilon}, chunks of {loss_cfg.ot_chunk_pairs} pairs, "
          f"torch threads {args.threads}, load average {tuple(round(x, 2) for x in os.getloadavg())}")

    g = torch.Generator().manual_seed(0)
    patch_all = F.normalize(torch.randn(total, kv, dim, generator=g), dim=-1).requires_grad_()
    sentence_all = torch.randn(total, slots, dim, generator=g)
    counts = torch.randint(1, slots + 1, (total,), generator=g)
    sentence_mask_all = torch.arange(slots)[None] < counts[:, None]
    sentence_all = (F.normalize(sentence_all, dim=-1) * sentence_mask_all[..., None]).requires_grad_()
    image_global = F.normalize(torch.randn(total, dim, generator=g), dim=-1)
    report_global = F.normalize(image_global + 0.5 * torch.randn(total, dim, generator=g), dim=-1)

    def ot_step(tol: float, negatives: int | None, max_iter: int) -> tuple[float, int]:
        patch_all.grad = sentence_all.grad = None
        start = time.perf_counter()
        loss, stats = local_ot_partial(
            patch_all[:n], patch_all, sentence_all[:n], sentence_all, sentence_mask_all[:n], sentence_mask_all,
            offset=0, eps=loss_cfg.ot_epsilon, max_iter=max_iter, tol=tol, temperature=loss_cfg.local_temperature,
            chunk_pairs=loss_cfg.ot_chunk_pairs, negatives=negatives,
            similarity_rows=image_global[:n] @ report_global.t(), similarity_cols=report_global[:n] @ image_global.t(),
        )
        loss.backward()
        return time.perf_counter() - start, stats.iterations

    settings = [("all negatives, tol 1e-4", loss_cfg.ot_tol, None), ("all negatives, 50 iterations", 0.0, None)]
    settings += [(f"{k} hardest negatives, 50 iterations", 0.0, k) for k in args.negatives]
    ot_times = {}
    for name, tol, k in settings:
        times = [ot_step(tol, k, loss_cfg.ot_max_iter) for _ in range(args.repeats)]
        ot_times[name] = min(t for t, _ in times)
        pairs = 2 * n * (total if k is None else min(k, total - 1) + 1)
        print(f"local OT fwd+bwd, {name:<34}: {ot_times[name]:7.2f} s  ({pairs} pairs, {times[-1][1]} iterations)")

    # The model step with every other loss term on (global, reconstruction, integrity full view), OT off.
    no_ot = LossConfig(lambda_local=0.0)
    torch.manual_seed(0)
    module = MLIPTrainingModule(model_cfg, no_ot, rank=0, world_size=1).train()
    small_batch = synthetic_batch(model_cfg, args.model_batch, args.tokens, args.sentences)

    def model_step() -> None:
        module.zero_grad(set_to_none=True)
        loss, _ = module(small_batch)
        loss.backward()

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the warm-up step (allocations) also counts FLOPs
        model_step()
    print(f"paper model fwd+bwd FLOPs (OT off, incl. the no-grad full view): "
          f"{counter.get_total_flops() / args.model_batch / 1e9:.1f} GFLOP/image at {args.tokens} tokens")
    model_times = [time_once(model_step) for _ in range(args.repeats)]
    per_image = min(model_times) / args.model_batch
    model_full = per_image * n
    print(f"paper model fwd+bwd (OT off), {args.model_batch} images, {args.tokens} tokens: "
          f"{', '.join(f'{t:.1f}' for t in model_times)} s -> {per_image:.2f} s/image -> {model_full:.1f} s for {n} "
          "images (linear extrapolation)")
    for name, t in ot_times.items():
        print(f"OT share of (model + OT), {name:<34}: {t / (model_full + t):6.1%}  (target <= 25%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("run", "memory", "ot", "all"), default="all")
    parser.add_argument("--preset", default=None, help="model preset (run: small; memory: paper)")
    parser.add_argument("--shards", type=Path, help="run: shard folder; default builds synthetic shards")
    parser.add_argument("--micro", type=int, default=None, help="per-rank batch (run: 8; memory: 1)")
    parser.add_argument("--steps", type=int, default=20, help="run: training steps per launch")
    parser.add_argument("--skip", type=int, default=4, help="run: warm-up steps left out of the medians")
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=None, help="synthetic text length (run/memory: 64; ot: 128)")
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--stages", default="1,2,3", help="memory: ZeRO stages")
    parser.add_argument("--local-images", type=int, default=32)
    parser.add_argument("--reports", type=int, default=256)
    parser.add_argument("--negatives", type=lambda s: [int(x) for x in s.split(",") if x], default=[31])
    parser.add_argument("--model-batch", type=int, default=4, help="ot: images in the timed model step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_worker:
        memory_worker(args)
        return
    parts = ("run", "memory", "ot") if args.part == "all" else (args.part,)
    for part in parts:
        ns = argparse.Namespace(**vars(args))
        ns.preset = args.preset or {"run": "small", "memory": "paper", "ot": "paper"}[part]
        ns.micro = args.micro or {"run": 8, "memory": 1, "ot": 1}[part]
        ns.tokens = args.tokens or {"run": 64, "memory": 64, "ot": 128}[part]
        print(f"== {part} ==", flush=True)
        {"run": part_run, "memory": part_memory, "ot": part_ot}[part](ns)


if __name__ == "__main__":
    main()
