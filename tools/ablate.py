#!/usr/bin/env python
"""Validation study: what each part of MLIP contributes, same data, budget and seeds for every row.

    python tools/ablate.py --shards runs/demo/shards --out runs/ablation [--seeds 0 1 2] [--steps 150]
        [--rows a b c d e f] [--parallel 2] [--config mlip_dist/configs/study_fast.yaml] [--set FIELD VALUE ...]

Rows (config overrides on top of --config):
  a  global contrastive loss only (CLIP-style): no masking, no integrity weights, no OT, no reconstruction
  b  + patch masking (and masked image prediction, which needs the masked patches)
  c  + semantic integrity weighting (relative)
  d  + OT sentence-patch matching = full MLIP
  e  full MLIP without masked image prediction
  f  full MLIP with the learned integrity variant
Every run is a real `pretrain.py` job (1 rank) followed by `evaluate.py --task all` on the test split;
the table (mean and standard deviation over seeds) goes to <out>/results.md and <out>/results.json.
Finished runs are reused, so the study resumes after an interruption; `--report` tabulates the runs that have
finished without training anything (the seeds column says which seeds each row has).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlip_dist.launching import launch_environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

ROWS: dict[str, tuple[str, list[str]]] = {
    "a": ("global only (CLIP-style)", ["--model.image.mask_ratio", "0", "--loss.integrity", "none",
                                       "--loss.lambda_local", "0", "--loss.lambda_reconstruction", "0"]),
    "b": ("+ patch masking", ["--loss.integrity", "none", "--loss.lambda_local", "0"]),
    "c": ("+ semantic integrity", ["--loss.integrity", "relative", "--loss.lambda_local", "0"]),
    "d": ("+ OT matching = full MLIP", ["--loss.integrity", "relative"]),
    "e": ("full MLIP without reconstruction", ["--loss.integrity", "relative", "--loss.lambda_reconstruction", "0"]),
    "f": ("full MLIP, learned integrity", ["--loss.integrity", "learned"]),
}

METRICS: dict[str, tuple[str, ...]] = {
    "zero-shot AUC (combined)": ("zero_shot", "mean_auc_combined"),
    "zero-shot AUC (global)": ("zero_shot", "mean_auc_global"),
    "zero-shot AUC (local OT)": ("zero_shot", "mean_auc_local"),
    "i2r R@10": ("retrieval", "image_to_report", "R@10"),
    "r2i R@10": ("retrieval", "report_to_image", "R@10"),
    "probe AUC 1%": ("linear_probe", "1%", "mean_auc"),
    "probe AUC 100%": ("linear_probe", "100%", "mean_auc"),
    "seg Dice 1%": ("segmentation", "1%", "dice"),
    "seg Dice 100%": ("segmentation", "100%", "dice"),
    "pointing game": ("grounding", "pointing_game"),
    "grounding IoU": ("grounding", "iou"),
}


def lookup(results: dict, path: tuple[str, ...]) -> float:
    """The number at ``path`` in nested results (evaluate.py's results.json), nan when it is missing."""
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return float("nan")
        node = node[key]
    return float(node)


def one_rank_pretrain(port: int, config: Path, shards: Path, run_dir: Path, steps: int, seed: int,
                      *overrides: str) -> list[str]:
    """A `pretrain.py` job on one rank (torchrun, ZeRO-2): ``steps`` steps, training and data order seeded with
    ``seed``, no heat-map images, one checkpoint at the end; ``overrides`` come last and win."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port),
            str(REPO / "mlip_dist" / "pretrain.py"), "--config", str(config), "--deepspeed_config",
            str(REPO / "ds_configs" / "zero2.json"), "--data.shards", str(shards), "--train.output_dir",
            str(run_dir), "--train.max_steps", str(steps), "--train.seed", str(seed), "--data.seed", str(seed),
            "--train.image_log_every", "0", "--train.save_every", str(steps), *overrides]


def run_logged(commands: list[list[str]], log_path: Path) -> None:
    """Run ``commands`` one after the other from the repository root, appending each (and its output) to
    ``log_path``; CalledProcessError on the first that fails."""
    with open(log_path, "a") as log:
        for command in commands:
            log.write("+ " + shlex.join(command) + "\n")
            log.flush()
            subprocess.run(command, cwd=REPO, env=launch_environment(), stdout=log, stderr=subprocess.STDOUT,
                           check=True)


def run_one(row: str, seed: int, args: argparse.Namespace, port: int) -> dict:
    run_dir = args.out / f"{row}_seed{seed}"
    if (done := finished(row, seed, args.out)) is not None:
        return done
    train = one_rank_pretrain(port, args.config, args.shards, run_dir, args.steps, seed,
                              "--train.global_batch_size", str(args.batch), "--data.num_workers", "1",
                              *(arg for key, value in args.set for arg in (f"--{key}", value)), *ROWS[row][1])
    evaluate = [sys.executable, str(REPO / "mlip_dist" / "evaluate.py"), "--checkpoint", str(run_dir), "--data",
                str(args.shards), "--split", "test", "--out", str(run_dir / "eval"), "--seed", str(seed),
                "--seg-epochs", "30", "--no-progress"]
    started = time.time()
    run_logged([train, evaluate], args.out / f"{row}_seed{seed}.log")
    print(f"row {row} seed {seed}: {time.time() - started:.0f} s", flush=True)
    return finished(row, seed, args.out)


def finished(row: str, seed: int, out: Path) -> dict | None:
    """The evaluation results of a finished run, or None when it has not finished."""
    path = out / f"{row}_seed{seed}" / "eval" / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(results: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    """Markdown table (mean ± sample standard deviation over the seeds each row has) and the raw values.

    ``results`` maps row -> {seed: evaluate.py results}; rows may have different numbers of seeds (a study
    that is still running), so the number is a column of its own.
    """
    header = "| row | seeds | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 2)]
    summary: dict[str, dict] = {}
    for row, runs in results.items():
        if not runs:
            continue
        cells = []
        summary[row] = {"seeds": sorted(runs)}
        for name, path in METRICS.items():
            values = np.array([lookup(runs[seed], path) for seed in sorted(runs)], dtype=float)
            summary[row][name] = values.tolist()
            finite = values[np.isfinite(values)]
            cells.append(f"{finite.mean():.3f} ± {finite.std(ddof=1) if len(finite) > 1 else 0:.3f}"
                         if len(finite) else "n/a")
        seeds = ",".join(str(seed) for seed in sorted(runs))
        lines.append(f"| {row}: {ROWS[row][0]} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def per_seed_table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown table with one line per finished run (row, seed), the same metrics as ``table``."""
    lines = ["| row | seed | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
    for row, runs in results.items():
        for seed in sorted(runs):
            values = (lookup(runs[seed], path) for path in METRICS.values())
            lines.append(f"| {row} | {seed} | " + " | ".join("n/a" if np.isnan(v) else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--config", type=Path, default=REPO / "mlip_dist" / "configs" / "study_fast.yaml")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"),
                        help="config override for every run, e.g. --set model.text.max_length 128 (rows' own win)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one core each)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate the runs under --out that have finished")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.shards = args.shards.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if args.report:
        results = {row: {seed: r for seed in args.seeds if (r := finished(row, seed, args.out)) is not None}
                   for row in args.rows}
    else:
        jobs = [(row, seed) for seed in args.seeds for row in args.rows]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {job: pool.submit(run_one, *job, args, 29600 + index) for index, job in enumerate(jobs)}
            results = {row: {} for row in args.rows}
            for (row, seed), future in futures.items():
                try:
                    results[row][seed] = future.result()
                except subprocess.CalledProcessError as err:  # one failed run must not lose the others
                    failed.append(f"row {row} seed {seed}: exit {err.returncode}, see {args.out / f'{row}_seed{seed}.log'}")
    markdown, summary = table(results)
    command = "python tools/ablate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "results.md").write_text(f"Command: `{command}`\n\n{markdown}\nPer run:\n\n{per_seed_table(results)}")
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(markdown)
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
