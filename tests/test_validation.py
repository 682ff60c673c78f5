"""Validation during training and the best checkpoint (issue 16, points 1 and 2)."""

from __future__ import annotations

import json

import pytest
import torch
from launch_utils import REPO
from tiny_engines import make_engine

from mlip_dist.training import checkpoint as ckpt


def test_the_best_checkpoint_survives_pruning_and_is_selectable(single_rank_group, tmp_path):
    """A run whose metric peaks early (step 2 of 5): keep_last 2 prunes steps 1 and 3, never the best."""
    from mlip_dist.config import TrainConfig, ValMetric
    from mlip_dist.model_io import CheckpointError, resolve_checkpoint
    from mlip_dist.training.checkpointer import Checkpointer
    from mlip_dist.training.state import DataLayout, RunCounts, TrainingState

    engine = make_engine(2)
    run_dir = tmp_path / "run"
    train = TrainConfig(keep_last=2, best_metric=ValMetric.I2R_R10, save_consolidated=False)
    checkpointer = Checkpointer(engine, run_dir / "checkpoints", rank=0, train=train, frozen={})
    layout = DataLayout(world_size=1, num_workers=0, global_batch_size=4, steps_per_epoch=10)
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        resolve_checkpoint(run_dir, "best")  # nothing yet
    for step, recall in enumerate([0.10, 0.50, 0.30, 0.20, 0.45], start=1):
        best = checkpointer.improved({"val/i2r_R@10": recall, "val/loss/total": 1.0})
        checkpointer.save(TrainingState(step=step), RunCounts(), layout, "periodic", best=best)
    assert [tag for _, tag in ckpt.complete_tags(run_dir / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000005"]
    assert json.loads((run_dir / "checkpoints" / "best").read_text()) == {
        "tag": "step_00000002", "step": 2, "metric": "val/i2r_R@10", "value": 0.5}
    assert resolve_checkpoint(run_dir, "best")[1].name == "step_00000002"
    assert resolve_checkpoint(run_dir, "latest")[1].name == "step_00000005"
    assert resolve_checkpoint(run_dir)[1].name == "step_00000005"  # the default stays latest
    # A new launch continues the comparison from the saved best, and a loss metric is minimised.
    again = Checkpointer(engine, run_dir / "checkpoints", rank=0, train=train, frozen={})
    assert again.improved({"val/i2r_R@10": 0.49}) is None and again.improved({"val/i2r_R@10": 0.6}) is not None
    loss_train = TrainConfig(best_metric=ValMetric.LOSS_TOTAL)
    by_loss = Checkpointer(engine, tmp_path / "other", rank=0, train=loss_train, frozen={})
    assert by_loss.improved({"val/loss/total": 2.0}) and by_loss.improved({"val/loss/total": 1.0})
    assert by_loss.improved({"val/loss/total": 1.5}) is None


def test_evaluate_and_export_take_select():
    from mlip_dist.evaluate import parse_args as evaluate_args
    from mlip_dist.export import parse_args as export_args

    assert evaluate_args(["--checkpoint", "r", "--data", "d", "--select", "best"]).select == "best"
    assert evaluate_args(["--checkpoint", "r", "--data", "d"]).select == "latest"
    assert export_args(["--checkpoint", "r", "--out", "o", "--select", "best"]).select == "best"
    with pytest.raises(SystemExit):
        export_args(["--checkpoint", "r", "--out", "o", "--select", "worst"])


@pytest.mark.slow
def test_validation_during_training_equals_evaluate_on_the_same_checkpoint(tmp_path, synthetic_shards, minilm_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_evaluate import evaluate_in_process
    from test_pretrain import run, torchrun, write_config

    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=6, save_every=6, eval_every=3,
                          eval_max_samples=5, image_log_every=0, best_metric="val/i2r_R@10")
    run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero2.json"), REPO)
    run_dir = tmp_path / "run"
    history = [json.loads(line) for line in (run_dir / "val_history.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == [3, 6]
    final = history[-1]
    assert final["val/samples"] == 5
    for name in ("val/loss/total", "val/loss/global", "val/loss/local", "val/loss/reconstruction"):
        assert torch.isfinite(torch.tensor(final[name])), name
    common = ["--checkpoint", str(run_dir), "--data", str(synthetic_shards), "--split", "validate",
              "--max-samples", "5", "--batch-size", "4", "--no-progress"]
    retrieval = evaluate_in_process(*common, "--task", "retrieval", "--out", str(tmp_path / "e1"))["retrieval"]
    zero_shot = evaluate_in_process(*common, "--task", "zero_shot", "--out", str(tmp_path / "e2"))["zero_shot"]
    assert retrieval["n"] == 5
    for k in (1, 5, 10):
        assert final[f"val/i2r_R@{k}"] == pytest.approx(retrieval["image_to_report"][f"R@{k}"], abs=1e-12)
        assert final[f"val/r2i_R@{k}"] == pytest.approx(retrieval["report_to_image"][f"R@{k}"], abs=1e-12)
    assert final["val/zero_shot_auc"] == pytest.approx(zero_shot["mean_auc_global"], abs=1e-9)
    best = json.loads((run_dir / "checkpoints" / "best").read_text())
    assert best["metric"] == "val/i2r_R@10" and best["step"] in (3, 6)
    assert best["value"] == max(entry["val/i2r_R@10"] for entry in history)
    assert (run_dir / "checkpoints" / best["tag"] / ckpt.COMPLETE_MARKER).is_file()
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/i2r_R@10")] == [3, 6]
