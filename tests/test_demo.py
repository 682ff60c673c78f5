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
    assert len(stages) == 11, stages
    for index, tool in enumerate(["tools/make_synthetic.py", "tools/make_shards.py"] + ["tools/make_eval_shards.py"] * 3
                                 + ["tools/train_tokenizer.py"]):
        assert f" {tool} " in stages[index], (tool, stages[index])
    assert "deepspeed" in stages[6].split()[1] and "--num_gpus 2" in stages[6] and "pretrain.py" in stages[6]
    assert all("evaluate.py" in stage for stage in stages[7:])
    # The run's text encoder uses the vocabulary trained on the demo's own training reports.
    from transformers import AutoTokenizer

    text = json.loads((out / "run" / "config.json").read_text())["model"]["text"]
    assert text["tokenizer"] == str(out / "tokenizer") and text["vocab_size"] == 1024
    vocabulary = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    assert 50 < len(vocabulary) <= 1024
    assert vocabulary.tokenize("heart size is normal")[:2] == ["heart", "size"]

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
    # The headline metrics next to their chance levels and the demo's targets.
    table = first.stdout[first.stdout.index("## What the model learned"):]
    for name in ("zero-shot AUC", "image-to-report Recall@10", "pointing game"):
        assert f"| {name}" in table, table

    again = subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [line for line in again.stdout.splitlines() if line.startswith("+ ")]  # every stage reused
    assert "## synthetic" in again.stdout


def test_against_chance_puts_each_metric_next_to_its_chance_level_and_target():
    sys.path.insert(0, str(REPO / "tools"))
    from demo import against_chance

    results = {"zero_shot": {"mean_auc_combined": 0.72},
               "retrieval": {"n": 200, "image_to_report": {"R@10": 0.24}},
               "grounding": {"pointing_game": 0.08, "pointing_game_chance": 0.03}}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in against_chance(results).splitlines()
            if line.startswith("| ") and "metric" not in line}
    auc, recall, pointing = (rows[name] for name in ("zero-shot AUC (mean over findings)", "image-to-report Recall@10",
                                                      "pointing game"))
    assert auc[1:3] == ["0.720", "0.500"] and auc[-1] == "yes |"
    assert recall[1:4] == ["0.240", "0.050", "4.8x"] and recall[-1] == "NO |"  # chance 10/200, target 5x = 0.25
    assert pointing[1:4] == ["0.080", "0.030", "2.7x"] and pointing[-1] == "NO |"  # target 3x = 0.09
    results["grounding"]["pointing_game"] = 0.1
    assert against_chance(results).splitlines()[-1].endswith("| yes |")
