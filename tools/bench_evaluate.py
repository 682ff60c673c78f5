#!/usr/bin/env python
"""Evaluation throughput with 1 and 2 ranks on CPU, side by side (issue 5, point 10).

    OMP_NUM_THREADS=1 python tools/bench_evaluate.py --checkpoint runs/demo/run --data runs/demo/shards \
        [--split train] [--task retrieval] [--repeats 2]

Each configuration is a real `torchrun ... mlip_dist/evaluate.py` job; the time of the job (model load,
feature extraction of the split, gather, metrics) and the images it read give images/s. Prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlip_dist.launching import launch_environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(ranks: int, args: argparse.Namespace, out: Path, port: int) -> tuple[float, int]:
    env = launch_environment()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
           str(REPO / "mlip_dist" / "evaluate.py"), "--checkpoint", str(args.checkpoint), "--data", str(args.data),
           "--split", args.split, "--task", args.task, "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - started
    images = json.loads((out / "results.json").read_text())["test_images"]
    return seconds, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--task", default="retrieval")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"cpu count {os.cpu_count()}, load average before {os.getloadavg()}")
    timings: dict[int, list[float]] = {1: [], 2: []}
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for ranks in (1, 2):  # interleaved, so load changes hit both alike
                seconds, images = run(ranks, args, Path(tmp) / f"{ranks}_{repeat}", 29850 + 2 * repeat + ranks)
                timings[ranks].append(seconds)
    for ranks, values in timings.items():
        median = statistics.median(values)
        print(f"{ranks} rank(s): {images} images in {median:.1f} s (median of {len(values)}) = {images / median:.1f} img/s")
    speedup = statistics.median(timings[1]) / statistics.median(timings[2])
    print(f"2 ranks / 1 rank throughput: {speedup:.2f}x")
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
