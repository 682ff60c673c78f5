"""Export: the exported files reproduce the training model's features with plain transformers/timm/torch."""

from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlip_dist.config import (
    GlobalPool,
    LossConfig,
    MLIPConfig,
    ModelConfig,
    PatchStem,
    ProjectionKind,
    to_dict,
)
from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD
from mlip_dist.export import ExportError, export_run, load_exported, main
from mlip_dist.model_io import CheckpointError
from mlip_dist.models.mlip import MLIPModel
from mlip_dist.models.presets import tiny
from mlip_dist.text.tokenize import load_tokenizer, tokenize_with_spans
from mlip_dist.training.checkpoint import mark_complete

REPO = Path(__file__).resolve().parent.parent
REPORTS = [
    ["Heart size is normal.", "Lungs are clear.", "No pneumothorax."],
    ["Moderate right pleural effusion with adjacent atelectasis.", "Stable cardiomegaly."],
    ["No acute cardiopulmonary process."],
]


def make_run(root: Path, minilm: str, seed: int = 0,
             configure: Callable[[ModelConfig], None] | None = None) -> tuple[Path, MLIPModel]:
    """A run folder as pretrain.py leaves it (config.json + one complete consolidated checkpoint)."""
    config = MLIPConfig(preset="tiny", model=tiny(), loss=LossConfig())
    config.model.text.tokenizer = minilm
    if configure is not None:
        configure(config.model)
    torch.manual_seed(seed)
    model = MLIPModel(config.model, config.loss).eval()
    with torch.no_grad():  # move every weight away from its initialisation
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    from safetensors.torch import save_file

    tag = root / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tag / "model.safetensors"))
    mark_complete(root / "checkpoints", tag.name, {"step": 1, "reason": "test"})
    (root / "config.json").write_text(json.dumps(to_dict(config)))
    return root, model


def plain_project(heads: dict[str, torch.Tensor], x: torch.Tensor, name: str) -> torch.Tensor:
    if f"{name}.net.weight" in heads:
        y = F.linear(x, heads[f"{name}.net.weight"], heads[f"{name}.net.bias"])
    else:
        y = F.gelu(F.linear(x, heads[f"{name}.net.0.weight"], heads[f"{name}.net.0.bias"]))
        y = F.linear(y, heads[f"{name}.net.2.weight"], heads[f"{name}.net.2.bias"])
    return F.normalize(y, dim=-1)


def check_with_plain_libraries(out: Path, model: MLIPModel, minilm: str) -> None:
    """Load the export with plain timm/transformers/safetensors and compare to the training model."""
    import timm
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    spec = json.loads((out / "image_encoder" / "config.json").read_text())
    stem = {}
    if "conv_patch_stem" in spec:  # the one part timm does not have
        from functools import partial

        from mlip_dist.models.patch_stem import ConvPatchEmbed

        stem = {"embed_layer": partial(ConvPatchEmbed, **spec["conv_patch_stem"])}
    vit = timm.create_model(spec["timm_name"], **spec["create_kwargs"], **stem).eval()
    vit.load_state_dict(load_file(str(out / "image_encoder" / "model.safetensors")), strict=True)
    bert = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    exported_tokenizer = AutoTokenizer.from_pretrained(str(out / "text_encoder"))
    heads = load_file(str(out / "heads.safetensors"))
    manifest = json.loads((out / "export.json").read_text())
    config = model.config

    original_tokenizer = load_tokenizer(config.text)
    texts = [" ".join(r) for r in REPORTS]
    assert exported_tokenizer(texts)["input_ids"] == original_tokenizer(texts)["input_ids"]
    tokens = tokenize_with_spans(exported_tokenizer, REPORTS, config.text.max_length, config.max_sentences)
    reference_tokens = tokenize_with_spans(original_tokenizer, REPORTS, config.text.max_length, config.max_sentences)
    for got, want in zip(tokens, reference_tokens, strict=True):
        assert torch.equal(got, want)

    images = torch.randn(3, config.image.in_chans, config.image.image_size, config.image.image_size,
                         generator=torch.Generator().manual_seed(1))
    n_prefix = manifest["num_prefix_tokens"]
    with torch.no_grad():
        want_image = model.encode_image(images, mask_ratio=0.0)
        want_text = model.encode_text(*tokens)
        token_states = vit.forward_features(images)
        patch = token_states[:, n_prefix:]
        pooled = token_states[:, 0] if config.image.pool == GlobalPool.CLS else patch.mean(1)
        got_global = plain_project(heads, pooled, "image_global_proj")
        got_patch = plain_project(heads, patch, "patch_proj")

        input_ids, attention_mask, spans, sentence_mask = tokens
        states = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if config.text.pool == GlobalPool.CLS:
            report = states[:, 0]
        else:
            weights = attention_mask[..., None].float()
            report = (states * weights).sum(1) / weights.sum(1)
        got_report = plain_project(heads, report, "report_proj")
        got_sentences = torch.zeros_like(want_text.sentence_features)
        for b in range(states.shape[0]):
            for s in range(spans.shape[1]):
                if sentence_mask[b, s]:
                    start, end = spans[b, s].tolist()
                    got_sentences[b, s] = plain_project(heads, states[b, start:end].mean(0), "sentence_proj")

    assert got_global.shape == (3, config.embed_dim)
    assert got_patch.shape == (3, model.image_encoder.num_patches, config.embed_dim)
    assert sentence_mask.sum() == sum(len(r) for r in REPORTS)
    torch.testing.assert_close(got_global, want_image.global_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_patch, want_image.patch_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_report, want_text.report_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_sentences, want_text.sentence_features, atol=1e-5, rtol=0)
    assert heads["logit_scale.t"].item() == pytest.approx(model.logit_scale.t.item())
    assert manifest["logit_scale"] == pytest.approx(min(model.logit_scale.t.exp().item(), 100.0), rel=1e-6)
    assert (manifest["image_mean"], manifest["image_std"]) == (IMAGE_MEAN, IMAGE_STD)


def check_readme_snippet(out: Path, model: MLIPModel, tmp_path: Path) -> None:
    """The README's code block runs as written and gives the training model's embeddings."""
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'root = "path/to/this/folder"' in code
    script = tmp_path / "readme_snippet.py"
    script.write_text(code.replace('root = "path/to/this/folder"', f"root = {str(out)!r}"))
    size, chans = model.config.image.image_size, model.config.image.in_chans
    images = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(2))
    result = runpy.run_path(str(script), init_globals={"images": images, "sentences": REPORTS[1]})
    tokens = tokenize_with_spans(load_tokenizer(model.config.text), [REPORTS[1]], model.config.text.max_length,
                                 model.config.max_sentences)
    with torch.no_grad():
        want_image = model.encode_image(images, mask_ratio=0.0)
        want_text = model.encode_text(*tokens)
    torch.testing.assert_close(result["image_embedding"], want_image.global_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["patch_embeddings"], want_image.patch_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["report_embedding"], want_text.report_features, atol=1e-5, rtol=0)
    assert result["similarity"].shape == (2, 1)


def test_cli_export_matches_training_model_with_plain_libraries(tmp_path, minilm_path):
    run_dir, model = make_run(tmp_path / "run", minilm_path)
    out = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "mlip_dist.export", "--checkpoint", str(run_dir), "--out", str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "verified" in result.stdout
    assert not (tmp_path / "export.tmp").exists()
    assert {p.name for p in out.iterdir()} == {"text_encoder", "image_encoder", "heads.safetensors", "export.json",
                                              "mlip_config.json", "README.md"}
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((out / "mlip_config.json").read_text()) == json.loads((run_dir / "config.json").read_text())
    readme = (out / "README.md").read_text()
    assert "timm.create_model" in readme and f"{IMAGE_STD}" in readme
    check_with_plain_libraries(out, model, minilm_path)
    check_readme_snippet(out, model, tmp_path)

    # load_exported (our convenience loader) gives the same features as the training model too.
    exported = load_exported(out)
    tokens = exported.tokenize(REPORTS)
    with torch.no_grad():
        got, want = exported.encode_text(*tokens), model.encode_text(*tokens)
    torch.testing.assert_close(got.sentence_features, want.sentence_features, atol=1e-5, rtol=0)


def test_mean_pooling_and_mlp_heads_export(tmp_path, minilm_path):
    def mean_pool_mlp(config: ModelConfig) -> None:
        config.image.pool = GlobalPool.MEAN
        config.text.pool = GlobalPool.MEAN
        config.projection = ProjectionKind.MLP

    run_dir, model = make_run(tmp_path / "run", minilm_path, seed=1, configure=mean_pool_mlp)
    result = export_run(run_dir / "checkpoints" / "step_00000001", tmp_path / "export")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    assert result.manifest.image_pool == "mean" and result.manifest.projection == "mlp"
    assert result.manifest.step == 1
    check_with_plain_libraries(tmp_path / "export", model, minilm_path)
    check_readme_snippet(tmp_path / "export", model, tmp_path)


def test_conv_patch_stem_export(tmp_path, minilm_path):
    def conv_stem(config: ModelConfig) -> None:
        config.image.stem = PatchStem.CONV
        config.image.stem_width = 4

    run_dir, model = make_run(tmp_path / "run", minilm_path, seed=2, configure=conv_stem)
    with torch.no_grad():  # batch-norm statistics that are not the initial ones must be exported too
        for module in model.image_encoder.vit.patch_embed.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(run_dir / "checkpoints" / "step_00000001" / "model.safetensors"))
    result = export_run(run_dir, tmp_path / "export")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-5
    spec = json.loads((tmp_path / "export" / "image_encoder" / "config.json").read_text())
    assert spec["conv_patch_stem"] == {"width": 4}
    assert "ConvPatchEmbed" in (tmp_path / "export" / "README.md").read_text()
    check_with_plain_libraries(tmp_path / "export", model, minilm_path)
    check_readme_snippet(tmp_path / "export", model, tmp_path)


def test_run_saved_with_the_old_data_length_fields_loads_and_exports_its_trained_length(tmp_path, minilm_path):
    """Runs from before data.max_length / image_size / max_sentences moved to the model: their tokenisation
    length was data.max_length, and evaluation and export must keep reading reports that way."""
    run_dir, model = make_run(tmp_path / "run", minilm_path)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["text"]["max_length"] == 64
    saved["data"].update(image_size=224, max_sentences=16, max_length=40)
    (run_dir / "config.json").write_text(json.dumps(saved))
    from mlip_dist.model_io import load_run

    loaded = load_run(run_dir)
    assert loaded.config.model.text.max_length == 40
    assert export_run(run_dir, tmp_path / "export").manifest.max_length == 40


def test_overwrite_protection_and_clear_errors(tmp_path, minilm_path, capsys):
    run_dir, _ = make_run(tmp_path / "run", minilm_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["--checkpoint", str(run_dir), "--out", str(out), "--no-verify"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"

    missing = tmp_path / "no_such_run"
    assert main(["--checkpoint", str(missing), "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.tmp").exists()

    with pytest.raises(ExportError, match="would replace the run"):
        export_run(run_dir, run_dir, overwrite=True)
    assert (run_dir / "config.json").is_file()
    (tmp_path / "other.tmp").mkdir()
    (tmp_path / "other.tmp" / "notes.txt").write_text("not an export")
    with pytest.raises(ExportError, match="not an unfinished export"):
        export_run(run_dir, tmp_path / "other")
    assert (tmp_path / "other.tmp" / "notes.txt").is_file()

    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_run(empty_run, tmp_path / "other")

    # A weights file that does not fit the config is refused, and the old export stays.
    assert main(["--checkpoint", str(run_dir), "--out", str(out), "--overwrite", "--no-verify"]) == 0
    assert not (out / "keep.txt").exists() and (out / "heads.safetensors").is_file()
    assert not list(tmp_path.glob(".export.old.*"))
    config = json.loads((run_dir / "config.json").read_text())
    config["model"]["embed_dim"] = 16
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not fit"):
        export_run(run_dir, out, overwrite=True)
    assert (out / "heads.safetensors").is_file() and not (tmp_path / "export.tmp").exists()


def test_verification_rejects_an_export_that_does_not_match(tmp_path, minilm_path, monkeypatch):
    import mlip_dist.export as export_module

    run_dir, _ = make_run(tmp_path / "run", minilm_path)
    original = export_module.build_manifest

    def wrong_pool(loaded):  # the run pools the CLS token; mean pooling gives other image features
        return dataclasses.replace(original(loaded), image_pool="mean")

    monkeypatch.setattr(export_module, "build_manifest", wrong_pool)
    with pytest.raises(ExportError, match="image global features differ"):
        export_run(run_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tmp").exists()


@pytest.mark.slow
def test_export_of_a_real_zero3_checkpoint(tmp_path, synthetic_shards, minilm_path):
    from test_pretrain import run, torchrun, write_config

    from mlip_dist.model_io import load_run

    config = write_config(tmp_path, synthetic_shards, minilm_path, max_steps=2, save_every=2, zero_stage=3,
                          image_log_every=0)
    run(torchrun(2, "--config", str(config), "--deepspeed_config", "ds_configs/zero3.json"), REPO)
    out = tmp_path / "export"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "mlip_dist.export", "--checkpoint", str(tmp_path / "run"),
                             "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = load_run(tmp_path / "run")
    assert loaded.tag_dir.name == "step_00000002"
    check_with_plain_libraries(out, loaded.model, minilm_path)
