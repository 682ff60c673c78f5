"""Evaluation job: every task on synthetic report shards and on benchmark-layout shards, outputs,
an independent check of the zero-shot and retrieval numbers, and 1-rank == 2-rank metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_tool
from launch_utils import REPO, free_port, launcher_env
from safetensors.torch import save_file

from mlip_dist.config import MLIPConfig, to_dict
from mlip_dist.evaluation.benchmarks import load_prompts
from mlip_dist.evaluation.metrics import recall_at_k, roc_auc
from mlip_dist.models.mlip import MLIPModel
from mlip_dist.models.presets import tiny
from mlip_dist.training.checkpoint import mark_complete

EVALUATE = str(REPO / "mlip_dist" / "evaluate.py")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, minilm_path) -> Path:
    """A run folder as pretrain.py writes it: config.json + a complete step with model.safetensors."""
    root = tmp_path_factory.mktemp("run")
    config = MLIPConfig(model=tiny())
    config.model.text.tokenizer = minilm_path
    torch.manual_seed(0)
    model = MLIPModel(config.model, config.loss)
    (root / "config.json").write_text(json.dumps(to_dict(config)))
    tag = root / "checkpoints" / "step_00000042"
    tag.mkdir(parents=True)
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
    mark_complete(root / "checkpoints", tag.name, {"step": 42})
    return root


def evaluate_in_process(*argv: str) -> dict:
    from mlip_dist.evaluate import evaluate, parse_args

    return evaluate(parse_args(list(argv)))


def test_all_tasks_on_synthetic_report_shards(run_dir, synthetic_shards, tmp_path):
    out = tmp_path / "eval"
    results = evaluate_in_process("--checkpoint", str(run_dir), "--data", str(synthetic_shards), "--split",
                                  "validate", "--out", str(out), "--seg-epochs", "3", "--no-progress")
    saved = json.loads((out / "results.json").read_text())
    assert saved["checkpoint"].endswith("step_00000042")
    for kind in ("global", "local", "combined"):
        assert 0.0 <= saved["zero_shot"][f"mean_auc_{kind}"] <= 1.0
    assert set(saved["retrieval"]) == {"image_to_report", "report_to_image", "n"}
    assert set(saved["linear_probe"]) >= {"1%", "10%", "100%"}
    assert saved["linear_probe"]["1%"]["train_images"] < saved["linear_probe"]["100%"]["train_images"]
    assert 0.0 <= saved["segmentation"]["100%"]["dice"] <= 1.0
    assert 0.0 <= saved["grounding"]["pointing_game"] <= 1.0 and saved["grounding"]["sentences"] > 0
    assert (out / "results.md").read_text().startswith("| task | metric | value |")
    assert (out / "roc_curves.png").stat().st_size > 0 and (out / "grounding_heatmaps.png").stat().st_size > 0
    assert list((out / "tensorboard").iterdir())
    assert results["test_images"] == saved["test_images"] > 0


def test_zero_shot_and_retrieval_match_a_plain_recomputation(run_dir, synthetic_shards, tmp_path, minilm_path):
    """Recompute global zero-shot AUC and Recall@K from the model with plain code, image by image."""
    from mlip_dist.data.loader import (
        AugmentConfig,
        decode_image,
        iterate_tar_samples,
        preprocess_image,
        read_dataset_info,
    )
    from mlip_dist.model_io import load_run, load_tokenizer
    from mlip_dist.text.tokenize import tokenize_with_spans

    results = evaluate_in_process("--checkpoint", str(run_dir), "--data", str(synthetic_shards), "--split",
                                  "validate", "--task", "all", "--out", str(tmp_path / "e"), "--seg-epochs", "1",
                                  "--no-progress")
    loaded = load_run(run_dir)
    model, config = loaded.model, loaded.config
    tokenizer = load_tokenizer(config)
    augment = AugmentConfig(image_size=config.model.image.image_size, in_chans=3, enabled=False)
    samples = []
    for shard in read_dataset_info(synthetic_shards, "validate").shards:
        samples += list(iterate_tar_samples(shard, lambda s, e: None))
    samples.sort(key=lambda s: s["__key__"])
    with torch.no_grad():
        images = [model.encode_image(preprocess_image(decode_image(s["png"]), augment, None)[None]).global_features[0]
                  for s in samples]
        reports = []
        for s in samples:
            tokens = tokenize_with_spans(tokenizer, [json.loads(s["json"])["sentences"]], config.model.text.max_length,
                                         config.model.max_sentences)
            reports.append(model.encode_text(*tokens).report_features[0])
    image_matrix, report_matrix = torch.stack(images).numpy(), torch.stack(reports).numpy()
    recalls = recall_at_k(image_matrix @ report_matrix.T, ks=(1, 5))
    assert results["retrieval"]["image_to_report"]["R@1"] == pytest.approx(recalls[1], abs=1e-9)
    assert results["retrieval"]["image_to_report"]["R@5"] == pytest.approx(recalls[5], abs=1e-9)

    name, per_class = next(iter(results["zero_shot"]["per_class"].items()))
    prompt = load_prompts()[name]
    with torch.no_grad():
        def mean_prompt(texts):
            tokens = tokenize_with_spans(tokenizer, [[t] for t in texts], config.model.text.max_length, 1)
            return model.encode_text(*tokens).report_features.numpy()

        pos, neg = mean_prompt(prompt.positive), mean_prompt(prompt.negative)
    scale = float(model.logit_scale().detach())
    logits = np.stack([(image_matrix @ pos.T).mean(1), (image_matrix @ neg.T).mean(1)], 1) * scale
    prob = torch.softmax(torch.from_numpy(logits), 1)[:, 0].numpy()
    labels = np.array([{1: 1.0, -1: np.nan}.get(json.loads(s["json"])["labels"][name], 0.0) for s in samples])
    valid = ~np.isnan(labels)
    assert per_class["global"]["auc"] == pytest.approx(roc_auc(prob[valid], labels[valid]), abs=1e-6)


@pytest.mark.parametrize("benchmark", ["siim", "rsna", "chexpert5x200"])
def test_benchmark_layout_shards(benchmark, run_dir, synthetic_root, tmp_path):
    source = {"siim": "siim", "rsna": "rsna", "chexpert5x200": "chexpert"}[benchmark]
    shards = tmp_path / benchmark
    run_tool("tools/make_eval_shards.py", "--benchmark", benchmark, "--root", str(synthetic_root / source), "--out",
             str(shards), "--size", "96", "--per-class", "4")
    split = "test"
    results = evaluate_in_process("--checkpoint", str(run_dir), "--data", str(shards), "--split", split,
                                  "--out", str(tmp_path / "out"), "--seg-epochs", "2", "--no-progress")
    if benchmark == "chexpert5x200":
        assert 0.0 <= results["zero_shot"]["accuracy_global"] <= 1.0
        assert "accuracy_combined" in results["zero_shot"]
        assert "skipped" in results["retrieval"]
    else:
        assert 0.0 <= results["segmentation"]["100%"]["dice"] <= 1.0
        assert results["segmentation"]["channels"] == [{"siim": "Pneumothorax", "rsna": "Pneumonia"}[benchmark]]
        # Boxes (RSNA) and masks (SIIM) ground the positive prompts.
        assert 0.0 <= results["grounding"]["pointing_game"] <= 1.0 and results["grounding"]["images"] > 0
        assert results["segmentation"]["encoder"] == "frozen"
    if benchmark == "siim":
        tuned = evaluate_in_process("--checkpoint", str(run_dir), "--data", str(shards), "--split", split,
                                    "--task", "segmentation", "--seg-finetune", "--seg-epochs", "1",
                                    "--out", str(tmp_path / "tuned"), "--no-progress")
        assert tuned["segmentation"]["encoder"] == "fine-tuned"
        assert 0.0 <= tuned["segmentation"]["1%"]["dice"] <= 1.0


def test_pointing_and_overlap_on_a_hand_made_case():
    from mlip_dist.evaluation.tasks import _point_and_overlap

    heat = np.zeros((4, 4))
    heat[1, 2] = 5.0  # peak in patch (1, 2); mean heat is 5/16, so one patch is "above uniform"
    region = np.zeros((8, 8), dtype=bool)
    region[2:4, 4:8] = True  # patches (1, 2) and (1, 3) at 2x2 pixels per patch
    hit, iou, chance = _point_and_overlap(heat, region)
    assert hit and iou == pytest.approx(4 / 8) and chance == pytest.approx(2 / 16)
    region[:] = False
    region[6:, :2] = True
    assert _point_and_overlap(heat, region) == (False, 0.0, pytest.approx(1 / 16))


def test_pointing_game_chance_is_the_mean_hit_of_a_random_peak():
    """Independent check: the chance equals metrics.pointing_game averaged over a one-hot peak in every patch."""
    from mlip_dist.evaluation.metrics import pointing_game
    from mlip_dist.evaluation.tasks import _point_and_overlap

    rng = np.random.default_rng(0)
    region = np.zeros((96, 96), dtype=bool)
    region[10:50, 30:77] = True
    region[rng.random((96, 96)) < 0.1] = True
    grid = (8, 8)
    peaks = np.eye(64).reshape(64, *grid)
    reference = pointing_game(peaks, np.repeat(region[None], 64, axis=0)).mean()
    assert _point_and_overlap(rng.random(grid), region)[2] == pytest.approx(reference)


def test_segmentation_head_learns_a_region_the_tokens_carry():
    """Tokens that say which patches hold the finding: the few-shot head must segment it (Dice near 1 with all
    masks), the soft targets are the covered fraction of each loss cell, and images without a mask count as
    empty in training."""
    from mlip_dist.evaluation.extract import EvalFeatures
    from mlip_dist.evaluation.tasks import _soft_targets, loss_resolution, segmentation

    rng = np.random.default_rng(0)
    grid, size, n = (4, 4), 32, 80
    inside = rng.random((n, 16)) < 0.3
    masks = [np.kron(row.reshape(grid), np.ones((8, 8))).astype(np.uint16) << 2 for row in inside]  # bit 2
    tokens = (np.stack([inside, ~inside], -1) + 0.1 * rng.standard_normal((n, 16, 2))).astype(np.float16)

    def split(index):
        return EvalFeatures(keys=[str(i) for i in index], meta=[{}] * len(index), image_global=np.zeros((len(index), 2)),
                            image_embedding=np.zeros((len(index), 2)), patch_tokens=tokens[index],
                            masks=[masks[i] for i in index])

    train, test = split(np.arange(60)), split(np.arange(60, n))
    train.masks[0] = None  # no mask: empty targets, not an error
    results = segmentation(train, test, grid=grid, image_size=size, channels=[2], channel_names=["Lesion"],
                           epochs=60)
    assert results["100%"]["dice"] > 0.9
    assert loss_resolution(grid, size) == 16 and loss_resolution((16, 16), 32) == 32
    half = np.zeros((32, 32), dtype=np.uint16)
    half[:, :1] = 1  # half of each 2-pixel cell in column 0
    soft = _soft_targets([None, half], None, 16, chunk=1)
    assert soft.shape == (2, 1, 16, 16) and soft[0].sum() == 0
    assert torch.allclose(soft[1, 0, :, 0], torch.full((16,), 0.5)) and soft[1, 0, :, 1:].sum() == 0


@pytest.mark.slow
def test_two_ranks_give_the_same_metrics_as_one(run_dir, synthetic_shards, tmp_path):
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"r{ranks}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), EVALUATE, "--checkpoint", str(run_dir), "--data", str(synthetic_shards),
               "--split", "validate", "--out", str(out), "--seg-epochs", "3", "--no-progress"]
        result = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[ranks] = json.loads((out / "results.json").read_text())

    def numbers(tree, prefix=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield from numbers(value, f"{prefix}/{key}")
        elif isinstance(tree, (int, float)):
            yield prefix, float(tree)

    one, two = dict(numbers(outputs[1])), dict(numbers(outputs[2]))
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-5), key
