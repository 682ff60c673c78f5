#!/usr/bin/env python
"""The whole method on this machine: synthetic MIMIC-CXR -> shards -> a WordPiece vocabulary of the training
reports -> 2-rank DeepSpeed pre-training -> every evaluation task, with the result table printed at the end.

The demo's text encoder is a random-init BERT, so it gets a vocabulary of the demo's own reports
(``tools/train_tokenizer.py``, at most ``DEMO_VOCAB`` tokens) instead of MiniLM's 30,522: the word
embeddings were 80 % of the model's parameters and of the optimizer's work per step.

    python tools/demo.py --out runs/demo [--studies 2400] [--steps N] [--ranks 2] [--eval-images 400]
        [--seg-epochs 20]

Each stage is skipped when its output already exists, so a re-run after an interruption continues.
Commands run are printed, so the same steps can be reproduced by hand (see README).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import lookup  # noqa: E402

from mlip_dist.launching import launch_environment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "mlip_dist" / "configs" / "demo_small.yaml"
DEMO_VOCAB = 1024  # the synthetic reports need about 550 WordPiece tokens (train_tokenizer.py's vocab is <= this)


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("+", " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def summary_figure(run_dir: Path, eval_dir: Path, path: Path) -> None:
    """One PNG: the training loss curves (TensorBoard), the zero-shot ROC curves and the grounding heat maps
    (each sentence's OT heat map over its test X-ray, the ground-truth region outlined) of the evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlip_dist.evaluation.report import line_chart, stack_pictures

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = [t for t in ("loss/total", "loss/global", "loss/local", "loss/reconstruction", "val/loss/total")
            if t in events.Tags()["scalars"]]
    curves = {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)]) for tag in tags}
    chart = line_chart(curves, x_label="step", y_label="loss", title="pre-training loss")
    stack_pictures([chart, eval_dir / "roc_curves.png", eval_dir / "grounding_heatmaps.png"], path)


# What the demo's model must reach on the synthetic test split (issue 18): (results path, name, chance path or
# value, target as a multiple of chance or an absolute value).
TARGETS = (
    (("zero_shot", "mean_auc_combined"), "zero-shot AUC (mean over findings)", 0.5, ("at least", 0.70)),
    (("retrieval", "image_to_report", "R@10"), "image-to-report Recall@10", None, ("x chance", 5.0)),
    (("grounding", "pointing_game"), "pointing game", ("grounding", "pointing_game_chance"), ("x chance", 3.0)),
)


def against_chance(results: dict) -> str:
    """Each headline metric next to its chance level and the demo's target, as a small table."""
    lines = ["## What the model learned (synthetic test split)", "",
             "| metric | model | chance | model / chance | target | met |", "|---|---|---|---|---|---|"]
    reports = lookup(results, ("retrieval", "n"))
    for path, name, chance, (kind, target) in TARGETS:
        value = lookup(results, path)
        if chance is None:  # Recall@10 at random: 10 of the n reports
            chance = 10 / reports if reports > 0 else math.nan
        elif isinstance(chance, tuple):
            chance = lookup(results, chance)
        if math.isnan(value) or math.isnan(chance):
            lines.append(f"| {name} | n/a | | | | |")
            continue
        goal = target * chance if kind == "x chance" else target
        wanted = f">= {target:g}x chance ({goal:.3f})" if kind == "x chance" else f">= {target:.2f}"
        ratio = f"{value / chance:.1f}x" if kind == "x chance" else ""
        lines.append(f"| {name} | {value:.3f} | {chance:.3f} | {ratio} | {wanted} | "
                     f"{'yes' if value >= goal else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--studies", type=int, default=2400)
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the config's)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=400, help="CheXpert-style images (RSNA, SIIM: half each)")
    parser.add_argument("--seg-epochs", type=int, default=20, help="few-shot segmentation head epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = launch_environment()
    started = time.time()
    raw, shards, run_dir = out / "synthetic_mimic", out / "shards", out / "run"

    if not (raw / "mimic-cxr-2.0.0-split.csv.gz").is_file():
        run([python, "tools/make_synthetic.py", "--out", str(raw), "--studies", str(args.studies), "--seed",
             str(args.seed), "--format", "dicom", "--image-size", "256", "--eval-images", str(args.eval_images), "--workers", "2"], env)
    # 100 pairs a shard for 1200 studies or more; smaller sets get smaller shards, so that every rank's
    # loader worker still owns one (the loader refuses a rank without a shard).
    shard_size = max(4, min(100, args.studies // 12))
    if not (shards / "dataset.json").is_file():
        run([python, "tools/make_shards.py", "--root", str(raw), "--out", str(shards), "--size", "128",
             "--shard-size", str(shard_size), "--workers", "2"], env)
    for benchmark, source in (("chexpert5x200", "chexpert"), ("rsna", "rsna"), ("siim", "siim")):
        if not (out / benchmark / "dataset.json").is_file():
            run([python, "tools/make_eval_shards.py", "--benchmark", benchmark, "--root", str(raw / source), "--out",
                 str(out / benchmark), "--size", "128", "--per-class", "40"], env)

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer_config.json").is_file():
        run([python, "tools/train_tokenizer.py", "--shards", str(shards), "--out", str(tokenizer), "--vocab-size",
             str(DEMO_VOCAB), "--overwrite"], env)

    if not (run_dir / "train_summary.json").is_file():
        launcher = shutil.which("deepspeed") or str(Path(python).parent / "deepspeed")
        run([launcher, "--num_gpus", str(args.ranks), str(REPO / "mlip_dist" / "pretrain.py"), "--config", str(args.config), "--deepspeed_config",
             str(REPO / "ds_configs" / "zero2.json"), "--data.shards", str(shards), "--train.output_dir",
             str(run_dir), "--train.seed", str(args.seed), "--model.text.tokenizer", str(tokenizer),
             "--model.text.vocab_size", str(DEMO_VOCAB),
             *(["--train.max_steps", str(args.steps)] if args.steps else [])], env)

    evaluate = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port", "29533",
                str(REPO / "mlip_dist" / "evaluate.py"), "--checkpoint", str(run_dir), "--no-progress",
                "--seg-epochs", str(args.seg_epochs)]
    tables = {}
    for name, data, split in (("synthetic", shards, "test"), ("chexpert5x200", out / "chexpert5x200", "test"),
                              ("rsna", out / "rsna", "test"), ("siim", out / "siim", "test")):
        target = out / "eval" / name
        if not (target / "results.json").is_file():
            run(evaluate + ["--data", str(data), "--split", split, "--out", str(target)], env)
        tables[name] = (target / "results.md").read_text()

    print("\n# Results\n")
    for name, table in tables.items():
        print(f"## {name}\n\n{table}")
    print(against_chance(json.loads((out / "eval" / "synthetic" / "results.json").read_text())))
    summary = json.loads((run_dir / "train_summary.json").read_text())
    print(f"pre-training: {summary['step']} steps, loss {summary['loss_history'][0]:.3f} -> "
          f"{summary['loss_history'][-1]:.3f}")
    print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}  (evaluation: {out / 'eval'})")
    figure = out / "demo_summary.png"
    summary_figure(run_dir, out / "eval" / "synthetic", figure)
    print(f"summary picture (loss curves, ROC curves, OT heat maps against the ground-truth regions): {figure}")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
