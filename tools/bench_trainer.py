"""Issue 17: the full DeepSpeed training step against the bare forward + backward + optimizer step.

One process (world size 1, a gloo group as ``tests/conftest.py:single_rank_group`` starts it; nccl on a GPU),
same config, shapes and precision for both, measured back to back:

* trainer: the body of ``mlip_dist.pretrain.train``'s loop: the real ``build_train_loader`` with its worker
  processes, ``train_step`` (host-to-device copy, engine forward, backward and step with non-finite
  handling), the bad-step bookkeeping, ``ProgressLog.log`` every ``--log-every`` steps (no TensorBoard
  writer) and the stop-flag check (every step with the old ``train_step``; on logging steps with the new);
* bare: the same ``MLIPTrainingModule`` (same seed) forward + backward + gradient clipping (the run's
  ``grad_clip``, as DeepSpeed does) + the trainer's ``build_optimizer`` AdamW (fused; ``--bare-foreach``
  for torch's foreach one) on fp32 parameters (bf16 autocast when the engine runs bf16), on pre-collated
  batches already on the device.

Both are warmed up (``--warmup`` steps), then timed in ``--blocks`` alternating blocks of ``--steps`` in all,
so that another process's load spike on a shared machine hits both alike. Prints median and p90 step time,
the per-phase split (data wait, forward, backward + step) and, from a separate counted run (``TorchDispatchMode``: all ops, and ``aten._local_scalar_dense`` / ``aten.is_nonzero``
/ ``aten.item`` as host syncs; collectives by patching ``torch.distributed``), ops, host syncs and
collectives per phase on logging and non-logging steps; the loader's own rate against the trainer's
consumption; and last ``trainer/bare step time: R`` (ratio of medians).

    DS_ACCELERATOR=cpu python tools/bench_trainer.py                   # tiny preset, synthetic shards
    python tools/bench_trainer.py --preset small --batch 16 --steps 50
    python tools/bench_trainer.py --step-module /tmp/step_before.py     # an older mlip_dist/training/step.py
    python tools/bench_trainer.py --preset paper-tiny --batch 8                # paper's structure, widths of 64
    python tools/bench_trainer.py --preset paper --batch 128 --precision bf16 --shards S --tokenizer T   # a GPU

On a CPU the step runs on the cores the loader's workers leave (``--threads``, default ``cpu count - workers``,
at least 1), for both ways: a GPU node gives the workers cores of their own, and on 2 cores the workers would
otherwise slow the trainer's forward by ~50 % while the bare step, on pre-collated batches, has none running.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "barrier", "all_to_all_single", "reduce", "all_gather_object", "broadcast_object_list")


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops and host syncs per ``phase`` (set by the caller)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "data"
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.collectives: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.phase] += 1
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name in SYNC_OPS:
            self.syncs[self.phase] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted_collectives(counter: OpCounter):
    import torch.distributed as dist

    saved = {}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = original

        def wrapped(*args, __original=original, **kwargs):
            counter.collectives[counter.phase] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, wrapped)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_group() -> None:
    """A one-process group, as ``deepspeed.init_distributed`` makes it under a launcher."""
    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def load_step_module(path: Path | None):
    if path is None:
        from mlip_dist.training import step

        return step
    spec = importlib.util.spec_from_file_location("bench_step_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step_module"] = module
    spec.loader.exec_module(module)
    return module


def make_config(args, shards: Path, out_dir: Path):
    from mlip_dist.config import load_config
    from mlip_dist.models.presets import minilm_path

    config = {
        "preset": "paper" if args.preset == "paper-tiny" else args.preset,
        "data": {"shards": str(shards), "shuffle_buffer": 64, "augment": True},
        "train": {"output_dir": str(out_dir), "global_batch_size": args.batch, "max_steps": 10**6,
                  "warmup_steps": 10, "log_every": args.log_every, "image_log_every": 0, "eval_every": 0,
                  "lr": 1e-4, "precision": args.precision, "fused_adamw": not args.unfused_adamw},
    }
    if args.preset == "tiny":
        config["model"] = {"text": {"tokenizer": minilm_path()}}
    if args.preset == "paper-tiny":  # the paper preset's structure (every layer and tensor) at tiny widths
        config["model"] = {"image": {"width": 64, "num_heads": 4},
                           "text": {"tokenizer": minilm_path(), "vocab_size": 30522, "hidden_size": 64,
                                    "num_heads": 4, "intermediate_size": 256},
                           "decoder": {"width": 64, "num_heads": 4}}
    if args.tokenizer is not None:  # e.g. a local Bio_ClinicalBERT tokenizer for the paper preset on a GPU
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(args.tokenizer), local_files_only=True))
        config.setdefault("model", {}).setdefault("text", {}).update(tokenizer=str(args.tokenizer), vocab_size=vocab)
    if args.workers is not None:
        config["data"]["num_workers"] = args.workers
    path = out_dir / "config.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return load_config(path)


def make_loader(config, tokenizer, num_workers: int | None = None, pin_memory: bool = False):
    from mlip_dist.data.loader import build_train_loader

    return build_train_loader(
        config.data.shards, config.data.train_split, tokenizer=tokenizer, rank=0, world_size=1,
        micro_batch_size=config.train.global_batch_size, global_batch_size=config.train.global_batch_size,
        image_size=config.model.image.image_size, in_chans=config.model.image.in_chans,
        max_length=config.model.text.max_length, max_sentences=config.model.max_sentences,
        num_workers=config.data.num_workers if num_workers is None else num_workers,
        shuffle_buffer=config.data.shuffle_buffer, resampled=config.data.resampled, augment=config.data.augment,
        seed=config.data.seed, pin_memory=pin_memory)[0]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Trainer:
    """The loop body of ``pretrain.train`` around a real engine and loader."""

    def __init__(self, config, ds_config, step_module, tokenizer, device, out_dir: Path):
        from mlip_dist.training.engine import build_engine
        from mlip_dist.training.progress import ProgressLog
        from mlip_dist.training.state import TrainingState

        torch.manual_seed(config.train.seed)
        self.config, self.device, self.step_module = config, device, step_module
        self.engine, self.scheduler, _ = build_engine(config, ds_config, 0, 1)
        self.engine.train()
        self.bf16 = bool(ds_config["bf16"]["enabled"])
        from mlip_dist.data.prefetch import DevicePrefetcher

        self.loader = make_loader(config, tokenizer, pin_memory=device.type == "cuda")
        # As in pretrain.py: batches reach the device one copy ahead (overlapped with the step on CUDA).
        self.iterator = DevicePrefetcher(iter(self.loader), device, torch.bfloat16 if self.bf16 else None)
        self.progress = ProgressLog(None, out_dir, rank=0, world_size=1, device=device, max_steps=config.train.max_steps,
                                    global_batch_size=config.train.global_batch_size, resumed_at=0)
        self.state, self.bad_steps, self.stop_requested = TrainingState(), 0, False
        self.new_api = "log" in inspect.signature(step_module.train_step).parameters
        self.counter: OpCounter | None = None

    def instrument(self, counter: OpCounter) -> None:
        """Phases for the counted run: forward inside the engine's forward, backward + step in optimizer_step."""
        self.counter = counter

        def phased(method, during: str, after: str):
            def wrapped(*args, **kwargs):  # labels the counter of this step (logging steps have their own)
                self.counter.phase = during
                try:
                    return method(*args, **kwargs)
                finally:
                    self.counter.phase = after

            return wrapped

        self.engine.forward = phased(self.engine.forward, "forward", "data")
        self.step_module.optimizer_step = phased(self.step_module.optimizer_step, "backward_step", "loop")

    def body(self) -> tuple[object, bool]:
        sm, cfg, state = self.step_module, self.config.train, self.state
        if self.counter is not None:
            self.counter.phase = "data"
        logging_step = (state.step + 1) % cfg.log_every == 0
        kwargs = {"log": logging_step} if self.new_api else {}
        result, batch = sm.train_step(self.engine, self.iterator, self.device,
                                      torch.bfloat16 if self.bf16 else None, **kwargs)
        if self.counter is not None:
            self.counter.phase = "loop"
        state.counts.add_batch(batch)
        state.step += 1
        state.samples_seen += cfg.global_batch_size
        self.bad_steps = 0 if result.outcome is sm.StepOutcome.APPLIED else self.bad_steps + 1
        if self.bad_steps:
            state.counts.local.skipped_steps += 1
        stop = False
        if state.step % cfg.log_every == 0:  # the stop flag rides on the progress all-reduce, as in pretrain.py
            _, stop = self.progress.log(state.step, result, state.counts, self.scheduler.get_last_lr()[0],
                                        stop_requested=self.stop_requested)
        elif not self.new_api:  # the old trainer agreed on the flag every step
            stop = sm.any_rank(self.stop_requested, self.device)
        if stop:
            raise SystemExit("stop requested")
        return result, logging_step


def bare_setup(config, batches, device, bf16: bool, foreach: bool = False):
    from mlip_dist.training.engine import build_optimizer
    from mlip_dist.training.module import MLIPTrainingModule, parameter_groups

    torch.manual_seed(config.train.seed)
    module = MLIPTrainingModule(config.model, config.loss, rank=0, world_size=1).to(device)
    module.model.set_gradient_checkpointing(config.model.gradient_checkpointing)
    module.train()
    optimizer = build_optimizer(parameter_groups(module, config.train.weight_decay),
                                dataclasses.replace(config.train, fused_adamw=True))  # the trainer's AdamW, fused
    if foreach:  # the comparison of earlier sessions
        for group in optimizer.param_groups:
            group.update(fused=False, foreach=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext)

    def step(i: int, counter: OpCounter | None = None) -> tuple[float, float]:
        started = time.perf_counter()
        if counter is not None:
            counter.phase = "forward"
        with (autocast if bf16 else contextlib.nullcontext()):
            loss, _ = module(batches[i % len(batches)])
        forwarded = time.perf_counter()
        if counter is not None:
            counter.phase = "backward_step"
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), config.train.grad_clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forwarded - started, time.perf_counter() - forwarded

    return step


def timed(runs: dict, warmup: int, steps: int, blocks: int, device) -> dict[str, tuple[list[float], float]]:
    """Warm each up, then time ``steps`` steps of each in ``blocks`` alternating blocks (a load spike of another
    process on a shared machine then hits both alike). Returns per-step seconds and the synchronised mean."""
    done = dict.fromkeys(runs, 0)
    for name, run_one in runs.items():
        for _ in range(warmup):
            run_one(done[name])
            done[name] += 1
    times: dict[str, list[float]] = {name: [] for name in runs}
    totals = dict.fromkeys(runs, 0.0)
    sizes = [steps // blocks + (i < steps % blocks) for i in range(blocks)]
    for size in sizes:
        for name, run_one in runs.items():
            synchronize(device)
            block_start = time.perf_counter()
            for _ in range(size):
                start = time.perf_counter()
                run_one(done[name])
                done[name] += 1
                times[name].append(time.perf_counter() - start)
            synchronize(device)
            totals[name] += time.perf_counter() - block_start
    return {name: (times[name], totals[name] / steps) for name in runs}


def report_counts(label: str, counter: OpCounter, steps: int) -> None:
    phases = ("data", "forward", "backward_step", "loop")
    parts = [f"{p} {counter.ops[p] / steps:.0f} ops/{counter.syncs[p] / steps:.2f} syncs/"
             f"{counter.collectives[p] / steps:.2f} coll" for p in phases if counter.ops[p] or counter.collectives[p]]
    print(f"  {label}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, help="shard folder (dataset.json); default: synthetic, in a temp folder")
    parser.add_argument("--studies", type=int, default=120, help="synthetic studies when --shards is not given")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper", "paper-tiny"),
                        help="paper-tiny: the paper preset's layers at widths of 64 (CPU)")
    parser.add_argument("--tokenizer", type=Path, help="local tokenizer folder (model.text.tokenizer; vocab from it)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    parser.add_argument("--log-every", type=int, default=10, help="train.log_every (config default 10)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=5, help="alternating timed blocks of trainer and bare steps")
    parser.add_argument("--count-steps", type=int, default=10, help="steps of the counted (dispatch-mode) run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the step (default on a CPU: the cores the loader workers leave, at "
                             "least 1, as on a GPU node where the workers have cores of their own; on a GPU: torch's)")
    parser.add_argument("--unfused-adamw", action="store_true",
                        help="train.fused_adamw off: the trainer's AdamW as before (torch's single-tensor loop)")
    parser.add_argument("--bare-foreach", action="store_true",
                        help="the bare step's AdamW foreach instead of fused (the comparison of earlier sessions)")
    parser.add_argument("--step-module", type=Path, help="a step.py to use instead of mlip_dist/training/step.py")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mlip_dist.logging_utils import quiet_startup
    from mlip_dist.model_io import load_tokenizer
    from mlip_dist.pretrain import DEFAULT_DS_CONFIG, bf16_is_fast
    from mlip_dist.training.ds_config import build_deepspeed_config

    step_module = load_step_module(args.step_module)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with quiet_startup():
        start_group()
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as scratch:
        scratch = Path(scratch)
        image_size = {"tiny": 64, "small": 128, "paper": 224, "paper-tiny": 224}[args.preset]
        from bench_loader import build_synthetic_shards  # tools/ is on sys.path when run as a script

        shards = args.shards or build_synthetic_shards(scratch / "data", args.studies, image_size, 0)
        config = make_config(args, shards, scratch / "run")
        template = json.loads((DEFAULT_DS_CONFIG.parent / f"zero{max(args.zero_stage, 1)}.json").read_text())
        template["zero_optimization"]["stage"] = args.zero_stage
        ds_config = build_deepspeed_config(template, config.train, 1, bf16_is_fast())
        tokenizer = load_tokenizer(config)
        if args.threads is None and device.type == "cpu":
            # The loader's workers are real processes: on a CPU they would otherwise share the step's cores, and the
            # bare step (pre-collated batches) has none running. Both runs use the same thread count.
            args.threads = max(1, (os.cpu_count() or 1) - config.data.num_workers)
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"device {device}, preset {args.preset}, batch {args.batch}, ZeRO-{args.zero_stage}, trainer AdamW "
              f"{'single-tensor' if args.unfused_adamw else 'fused'}, bare AdamW "
              f"{'foreach' if args.bare_foreach else 'fused'}, "
              f"bf16={ds_config['bf16']['enabled']}, loader workers {config.data.num_workers}, log_every "
              f"{args.log_every}, torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
              f"load average {tuple(round(x, 2) for x in os.getloadavg())}")
        print(f"step module {step_module.__file__}")

        trainer = Trainer(config, ds_config, step_module, tokenizer, device, scratch / "run")
        print(f"train_step API: {'log= (syncs on logging steps only)' if trainer.new_api else 'old (every step)'}")
        records: list = []

        def trainer_one(_: int) -> None:
            records.append(trainer.body())

        bf16 = bool(ds_config["bf16"]["enabled"])
        batches = [next(trainer.iterator) for _ in range(4)]  # already on the device (DevicePrefetcher)
        bare = bare_setup(config, batches, device, bf16, args.bare_foreach)
        bare_phases: list[tuple[float, float]] = []
        measured = timed({"trainer": trainer_one, "bare": lambda i: bare_phases.append(bare(i))}, args.warmup,
                         args.steps, args.blocks, device)
        (trainer_times, trainer_mean), (bare_times, bare_mean) = measured["trainer"], measured["bare"]
        timed_records = records[args.warmup:]
        bare_phases = bare_phases[args.warmup:]

        # Counted runs (slower under the dispatch mode; not timed).
        counter = OpCounter()
        trainer.instrument(counter)
        log_counter = OpCounter()
        n_plain = n_log = 0
        for _ in range(args.count_steps):
            logging_next = (trainer.state.step + 1) % args.log_every == 0
            target = log_counter if logging_next else counter
            trainer.counter = target
            with counted_collectives(target), target:
                trainer.body()
            n_log += logging_next
            n_plain += not logging_next
        bare_counter = OpCounter()
        with counted_collectives(bare_counter), bare_counter:
            for i in range(args.count_steps):
                bare(i, bare_counter)

        def phase_line(label, data, fwd, bwd):
            print(f"  {label}: data wait {statistics.median(data) * 1e3:7.1f} ms, forward "
                  f"{statistics.median(fwd) * 1e3:7.1f} ms, backward+step {statistics.median(bwd) * 1e3:7.1f} ms "
                  "(medians)")

        print(f"step time (ms): median / p90 / mean over {args.steps} timed steps each, in {args.blocks} alternating blocks")
        for label, times, mean in (("trainer", trainer_times, trainer_mean), ("bare   ", bare_times, bare_mean)):
            print(f"  {label}: {statistics.median(times) * 1e3:7.1f} / {pct(times, 0.9) * 1e3:7.1f} / "
                  f"{mean * 1e3:7.1f}")
        print("per-phase split (trainer: StepResult.times; unsynchronised on non-logging steps on GPUs)")
        phase_line("trainer", [r.times.data_wait for r, _ in timed_records], [r.times.forward for r, _ in timed_records],
                   [r.times.backward_step for r, _ in timed_records])
        phase_line("bare   ", [0.0], [f for f, _ in bare_phases], [b for _, b in bare_phases])
        print(f"ops / host syncs / collectives per step and phase (counted run of {args.count_steps} steps)")
        report_counts(f"trainer, non-logging steps ({n_plain})", counter, max(n_plain, 1))
        report_counts(f"trainer, logging steps ({n_log})", log_counter, max(n_log, 1))
        report_counts(f"bare ({args.count_steps})", bare_counter, args.count_steps)
        skipped = sum(r.outcome is not step_module.StepOutcome.APPLIED for r, _ in records)
        print(f"trainer outcomes: {len(records) - skipped} applied, {skipped} skipped")

        del trainer.iterator, trainer.loader
        loader = make_loader(config, tokenizer)
        iterator = iter(loader)
        for _ in range(3):
            next(iterator)
        n = max(10, args.steps // 2)
        start = time.perf_counter()
        for _ in range(n):
            next(iterator)
        loader_rate = n * args.batch / (time.perf_counter() - start)
        del iterator, loader
        consumption = args.batch / statistics.median(trainer_times)
        print(f"loader alone ({config.data.num_workers} workers): {loader_rate:.1f} samples/s; trainer consumes "
              f"{consumption:.1f} samples/s; capacity/consumption {loader_rate / consumption:.2f}x")
        print(f"load average after {tuple(round(x, 2) for x in os.getloadavg())}")
        print(f"trainer/bare step time: {statistics.median(trainer_times) / statistics.median(bare_times):.2f}")


if __name__ == "__main__":
    main()
