#!/usr/bin/env python
"""Learning curves of candidate settings side by side: which setting makes pre-training learn, and how fast.

    python tools/learning_curves.py --shards runs/demo/shards --out runs/curves --steps 200 --eval-every 25 \
        --candidate base "" --candidate random_text "--model.text.path null --model.text.pool mean" \
        [--config mlip_dist/configs/small_minilm.yaml] [--seed 0] [--parallel 2] [--report]

Each candidate is a name and a string of config overrides (shell words, on top of --config). Every run is a real
`pretrain.py` job on one rank with validation every --eval-every steps (loss terms, Recall@K and zero-shot AUC
on the first --eval-samples validation pairs), so the curves are the trainer's own. The script prints, per
candidate, the training global loss (mean over each interval; chance is ln(global batch)) and the validation
image-to-report Recall@10 and zero-shot AUC at each validation step, writes them to <out>/curves.md and
<out>/curves.json and draws <out>/curves.png. Finished runs are reused (delete a run's folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import one_rank_pretrain, run_logged  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VAL_COLUMNS = {"val i2r R@10": "val/i2r_R@10", "val zero-shot AUC": "val/zero_shot_auc",
               "val global loss": "val/loss/global"}


def train_one(name: str, overrides: str, args: argparse.Namespace, port: int) -> Path:
    """Run one candidate's pre-training (skipped when its train_summary.json exists); return its run folder."""
    run_dir = args.out / name
    if (run_dir / "train_summary.json").is_file():
        return run_dir
    command = one_rank_pretrain(port, args.config, args.shards, run_dir, args.steps, args.seed,
                                "--train.eval_every", str(args.eval_every), "--train.eval_max_samples",
                                str(args.eval_samples), "--train.log_every", "5", "--train.keep_last", "1",
                                *shlex.split(overrides))
    started = time.time()
    run_logged([command], args.out / f"{name}.log")
    print(f"{name}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's TensorBoard training global loss and its validation history, as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    curves = {"global loss": [(e.step, e.value) for e in events.Scalars("loss/global")]}
    history = [json.loads(line) for line in (run_dir / "val_history.jsonl").read_text().splitlines() if line]
    for column, key in VAL_COLUMNS.items():
        curves[column] = [(row["step"], float(row[key])) for row in history if key in row]
    return curves


def value_at(points: list[tuple[int, float]], step: int) -> float:
    """The logged value at ``step`` (the last one logged at or before it), nan when none."""
    before = [value for at, value in points if at <= step]
    return before[-1] if before else float("nan")


def interval_mean(points: list[tuple[int, float]], after: int, upto: int) -> float:
    """Mean of the values logged at steps in (after, upto], nan when none (one batch's loss is noisy)."""
    values = [value for at, value in points if after < at <= upto]
    return sum(values) / len(values) if values else float("nan")


def tabulate(curves: dict[str, dict[str, list[tuple[int, float]]]], steps: list[int], chance: float) -> str:
    """Markdown: one table per quantity, a row per candidate and a column per step (the training loss: the
    mean of the values logged since the previous column)."""
    blocks = []
    for column in ("global loss", *VAL_COLUMNS):
        note = f", mean since the previous column (chance ln(batch) = {chance:.3f})" if column == "global loss" else ""
        lines = [f"**{column}**{note}", "", "| candidate | " + " | ".join(str(s) for s in steps) + " |",
                 "|---|" + "---|" * len(steps)]
        for name, runs in curves.items():
            if column == "global loss":
                cells = (interval_mean(runs[column], after, step) for after, step in zip([0, *steps], steps, strict=False))
            else:
                cells = (value_at(runs[column], step) for step in steps)
            lines.append(f"| {name} | " + " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def draw(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    from mlip_dist.evaluation.report import line_chart, stack_pictures

    charts = []
    for column in ("global loss", "val i2r R@10", "val zero-shot AUC"):
        series = {name: ([s for s, _ in runs[column]], [v for _, v in runs[column]]) for name, runs in curves.items()}
        charts.append(line_chart(series, x_label="step", y_label=column, title=column))
    stack_pictures(charts, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/curves"))
    parser.add_argument("--config", type=Path, default=REPO / "mlip_dist" / "configs" / "small_minilm.yaml")
    parser.add_argument("--candidate", nargs=2, action="append", required=True, metavar=("NAME", "OVERRIDES"),
                        help='a name and its config overrides, e.g. --candidate fast_lr "--train.lr 1e-3"')
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=256, help="validation pairs (the first N)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one core each)")
    parser.add_argument("--report", action="store_true", help="train nothing: tabulate the finished runs")
    args = parser.parse_args(argv)
    args.out, args.shards, args.config = args.out.resolve(), args.shards.resolve(), args.config.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in args.candidate]
    if len(set(names)) != len(names):
        parser.error(f"candidate names must be unique: {names}")
    if args.batch is not None:
        args.candidate = [(name, f"--train.global_batch_size {args.batch} {overrides}") for name, overrides in args.candidate]

    failed = []
    if not args.report:
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {name: pool.submit(train_one, name, overrides, args, 29700 + index)
                       for index, (name, overrides) in enumerate(args.candidate)}
            for name, future in futures.items():
                try:
                    future.result()
                except subprocess.CalledProcessError as err:  # one failed run must not lose the others
                    failed.append(f"{name}: exit {err.returncode}, see {args.out / f'{name}.log'}")
    curves = {name: read_curves(args.out / name) for name in names
              if (args.out / name / "train_summary.json").is_file()}
    if not curves:
        print("no finished runs", file=sys.stderr)
        return 1
    # Every run writes its resolved config; the candidates share the batch unless one overrides it.
    batch = json.loads((args.out / next(iter(curves)) / "config.json").read_text())["train"]["global_batch_size"]
    steps = sorted({step for runs in curves.values() for step, _ in runs["val i2r R@10"]})
    markdown = tabulate(curves, steps, math.log(batch))
    command = "python tools/learning_curves.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    (args.out / "curves.md").write_text(f"Command: `{command}`\n\n{markdown}")
    (args.out / "curves.json").write_text(json.dumps(curves, indent=1))
    draw(curves, args.out / "curves.png")
    print(markdown)
    print(f"curves: {args.out / 'curves.png'}")
    for failure in failed:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
