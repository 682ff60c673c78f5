"""tools/demo.py, the README's quick start, end to end at a tiny size: every stage runs through the same
commands as `make demo` (synthetic MIMIC-CXR, make_shards, evaluation shards, the deepspeed launcher on 2
CPU ranks, four evaluations), the tables are printed, and a second run resumes without redoing anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlip_dist.launching import launch_environment

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path, minilm_path):
    out = tmp_path / "demo"
    command = [sys.executable, "tools/demo.py", "--out", str(out), "--studies", "60", "--steps", "3",
               "--eval-images", "24", "--seg-epochs", "2"]
    first = subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = [line for line in first.stdout.splitlines() if line.startswith("+ ")]
    assert len(stages) == 10, stages
    for index, tool in enumerate(["tools/make_synthetic.py", "tools/make_shards.py"] + ["tools/make_eval_shards.py"] * 3):
        assert f" {tool} " in stages[index], (tool, stages[index])
    assert "deepspeed" in stages[5].split()[1] and "--num_gpus 2" in stages[5] and "pretrain.py" in stages[5]
    assert all("evaluate.py" in stage for stage in stages[6:])

    summary = json.loads((out / "run" / "train_summary.json").read_text())
    assert summary["step"] == 3 and summary["loss_history"]  # logged every 10 steps and at the last
    assert all(0 < loss < 100 for loss in summary["loss_history"])
    assert any((out / "run" / "tensorboard").iterdir())
    synthetic = json.loads((out / "eval" / "synthetic" / "results.json").read_text())
    for task, key in (("zero_shot", "mean_auc_global"), ("retrieval", "image_to_report"), ("linear_probe", "100%"),
                      ("segmentation", "100%"), ("grounding", "pointing_game")):
        assert key in synthetic[task], (task, synthetic[task])
    for benchmark in ("chexpert5x200", "rsna", "siim"):
        assert json.loads((out / "eval" / benchmark / "results.json").read_text())["zero_shot"], benchmark
    for heading in ("## synthetic", "## chexpert5x200", "## rsna", "## siim"):
        assert heading in first.stdout
    figure = out / "demo_summary.png"
    assert f"summary picture (loss curves, ROC curves, OT heat maps against the ground-truth regions): {figure}" \
        in first.stdout
    from PIL import Image

    with Image.open(figure) as picture:  # the loss chart, the ROC curves and the heat maps, stacked
        assert picture.height > 480 + 400 and picture.width >= 480
    assert "pre-training: 3 steps" in first.stdout and "TensorBoard: tensorboard --logdir" in first.stdout

    again = subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]  # every stage reused
    assert "## synthetic" in again.stdout
