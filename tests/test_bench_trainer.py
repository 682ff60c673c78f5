"""tools/bench_trainer.py (issue 17, point 1) runs end to end on the CPU and prints what it promises: both ways'
step times, the per-phase split, ops/syncs/collectives per phase, the loader's rate and the ratio line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlip_dist.launching import launch_environment

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("flags, trainer_adamw, bare_adamw", [
    ((), "fused", "fused"), (("--unfused-adamw", "--bare-foreach"), "single-tensor", "foreach")])
def test_bench_trainer_prints_its_report_and_the_ratio(flags, trainer_adamw, bare_adamw):
    command = [sys.executable, "tools/bench_trainer.py", "--studies", "40", "--warmup", "2", "--steps", "4",
               "--blocks", "2", "--count-steps", "2", "--log-every", "2", *flags]
    result = subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"trainer AdamW {trainer_adamw}, bare AdamW {bare_adamw}" in out
    # On a CPU the step gets the cores the loader workers leave (at least one), for both ways.
    workers, threads, cpus = map(int, re.search(r"loader workers (\d+), .*torch threads (\d+), cpu count (\d+)",
                                                out).groups())
    assert threads == max(1, cpus - workers)
    for label in ("trainer", "bare   "):
        assert re.search(rf"^  {label}: +[\d.]+ / +[\d.]+ / +[\d.]+$", out, re.M), label
    assert re.search(r"trainer, non-logging steps \(1\): .*backward_step \d+ ops/", out)
    assert re.search(r"trainer, logging steps \(1\): .*loop \d+ ops/", out)
    assert "trainer outcomes: 6 applied, 0 skipped" in out  # 2 warm-up + 4 timed steps
    ratio = re.search(r"^trainer/bare step time: (\d+\.\d\d)$", out.strip().splitlines()[-1])
    assert ratio and float(ratio.group(1)) > 0
