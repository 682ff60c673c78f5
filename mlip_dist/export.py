"""Export a trained MLIP run as plain transformers / timm / safetensors files.

Usage::

    python -m mlip_dist.export --checkpoint runs/mlip --out exports/mlip [--overwrite] [--no-verify]

``--checkpoint`` takes any form ``mlip_dist.model_io`` accepts (a run folder, its ``checkpoints/``
folder, or one ``step_NNNNNNNN`` tag folder; any ZeRO stage: the tag's consolidated fp32
``model.safetensors`` is read, nothing is unpickled). The export folder holds::

    text_encoder/      transformers folder: config.json, model.safetensors, tokenizer files
                       (AutoModel.from_pretrained / AutoTokenizer.from_pretrained)
    image_encoder/     model.safetensors (timm ViT state dict, no head) and config.json with
                       {"timm_name", "create_kwargs"}: timm.create_model(timm_name, **create_kwargs)
    heads.safetensors  the four projection heads (METHOD.md, Encoders: Projections) and logit_scale.t
    export.json        pooling, preprocessing constants, sizes, source checkpoint
    mlip_config.json   the run's resolved MLIPConfig
    README.md          how to use the files without mlip_dist

Written atomically: everything is built in ``<out>.tmp`` and renamed to ``<out>`` at the end; an
existing non-empty ``<out>`` is only replaced with ``--overwrite``. Unless ``--no-verify``, the
export is reloaded before it is published and its features must match the training model's
``encode_image`` / ``encode_text`` on fixed inputs. Inside Python, ``load_exported(out)`` rebuilds
an encoder pair with the same ``encode_image`` / ``encode_text`` / ``tokenize`` interface. The MAE
decoder and learned-integrity parameters are training-only and not exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlip_dist.config import GlobalPool, MLIPConfig, PatchStem, ProjectionKind, from_dict, to_dict
from mlip_dist.data.batch import IMAGE_MEAN, IMAGE_STD
from mlip_dist.model_io import SELECTIONS, CheckpointError, LoadedRun, load_run, load_tokenizer
from mlip_dist.models.heads import Projection
from mlip_dist.models.mlip import ImageFeatures, MLIPModel, TextFeatures
from mlip_dist.models.text_encoder import masked_mean, span_mean
from mlip_dist.text.tokenize import TokenizedReports, tokenize_with_spans
from mlip_dist.training.checkpoint import TAG_PATTERN

logger = logging.getLogger("mlip_dist.export")

EXPORT_FORMAT_VERSION = 1
TEXT_DIR = "text_encoder"
IMAGE_DIR = "image_encoder"
HEADS_FILE = "heads.safetensors"
MANIFEST_FILE = "export.json"
CONFIG_FILE = "mlip_config.json"
README_FILE = "README.md"
WEIGHTS_FILE = "model.safetensors"
HEAD_NAMES = ("image_global_proj", "patch_proj", "report_proj", "sentence_proj")
LOGIT_SCALE_KEY = "logit_scale.t"
# Float32 reduction-order noise between the training graph and the plain-library graph is ~1e-7;
# anything near this bound means wrong weights or wrong pooling, not rounding.
VERIFY_ATOL = 1e-4
_VERIFY_REPORTS = [
    ["Heart size is normal.", "The lungs are clear.", "No pleural effusion or pneumothorax."],
    ["Small left pleural effusion.", "Mild cardiomegaly."],
]


class ExportError(RuntimeError):
    """The export cannot be written or does not reproduce the training model."""


@dataclass(frozen=True)
class ExportManifest:
    """Contents of ``export.json``: what a user needs besides the weights to reproduce the features."""

    format_version: int
    source_checkpoint: str  # the tag folder the weights came from
    step: int | None
    embed_dim: int
    projection: str  # ProjectionKind value: "linear" (net.weight/bias) or "mlp" (net.0, GELU, net.2)
    logit_scale: float  # min(exp(logit_scale.t), logit_scale_max), the CLIP temperature inverse
    image_pool: str  # GlobalPool value: "cls" = token 0, "mean" = mean of the patch tokens
    image_size: int
    in_chans: int
    patch_size: int
    num_prefix_tokens: int  # tokens before the patch tokens in timm's forward_features output
    image_mean: float  # applied to grayscale pixels in [0, 1], then repeated to in_chans
    image_std: float
    text_pool: str  # GlobalPool value: "cls" = token 0, "mean" = attention-mask mean
    max_length: int
    max_sentences: int


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: ExportManifest
    max_abs_diff: float | None  # verification result; None when verification was skipped


def timm_create_spec(model: MLIPModel) -> dict[str, Any]:
    """``{"timm_name", "create_kwargs"}`` that rebuild the image encoder's ViT with plain timm.

    The architecture numbers are read from the built ViT (not the config's optional overrides) so
    that ``timm.create_model(timm_name, **create_kwargs)`` has exactly its parameter shapes. A conv patch
    stem (``model.image.stem: conv``) adds ``{"conv_patch_stem": {"width": w}}``: the ViT is then built
    with ``embed_layer=functools.partial(mlip_dist.models.patch_stem.ConvPatchEmbed, width=w)``.
    ``global_pool=""`` as in training: it builds no pooling parameters and keeps ``norm`` on all
    tokens, so ``forward_features`` equals the training encoder's unmasked pass.
    """
    vit: Any = model.image_encoder.vit
    image_config = model.config.image
    spec: dict[str, Any] = {}
    if image_config.stem == PatchStem.CONV:
        # timm has no such embed layer: load_exported passes mlip_dist's as create_model(embed_layer=...).
        spec["conv_patch_stem"] = {"width": image_config.stem_width}
    return spec | {
        "timm_name": image_config.name,
        "create_kwargs": {
            "pretrained": False,
            "num_classes": 0,
            "global_pool": "",
            "img_size": image_config.image_size,
            "patch_size": model.image_encoder.patch_size,
            "in_chans": image_config.in_chans,
            "embed_dim": model.image_encoder.embed_dim,
            "depth": len(vit.blocks),
            "num_heads": int(vit.blocks[0].attn.num_heads),
        },
    }


def build_manifest(loaded: LoadedRun) -> ExportManifest:
    model, config = loaded.model, loaded.config
    match = TAG_PATTERN.match(loaded.tag_dir.name)
    return ExportManifest(
        format_version=EXPORT_FORMAT_VERSION,
        source_checkpoint=str(loaded.tag_dir.resolve()),
        step=int(match.group(1)) if match else None,
        embed_dim=config.model.embed_dim,
        projection=ProjectionKind(config.model.projection).value,
        logit_scale=float(model.logit_scale().item()),
        image_pool=GlobalPool(config.model.image.pool).value,
        image_size=config.model.image.image_size,
        in_chans=config.model.image.in_chans,
        patch_size=model.image_encoder.patch_size,
        num_prefix_tokens=model.image_encoder.num_prefix_tokens,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        text_pool=GlobalPool(config.model.text.pool).value,
        max_length=config.model.text.max_length,
        max_sentences=config.model.max_sentences,
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_export(loaded: LoadedRun, tokenizer: Any, folder: Path) -> ExportManifest:
    """Write every export file of ``loaded`` into the existing empty ``folder`` (not atomic itself)."""
    from safetensors.torch import save_file

    model = loaded.model
    manifest = build_manifest(loaded)

    text_dir = folder / TEXT_DIR
    # transformers >= 5 always writes safetensors (the safe_serialization switch is gone).
    model.text_encoder.model.save_pretrained(str(text_dir))
    if not (text_dir / WEIGHTS_FILE).is_file():
        raise ExportError(f"{text_dir}: transformers did not write {WEIGHTS_FILE}")
    # Plain tokenizer(text, truncation=True) then truncates where training did.
    tokenizer.model_max_length = manifest.max_length
    tokenizer.save_pretrained(str(text_dir))

    image_dir = folder / IMAGE_DIR
    image_dir.mkdir()
    vit_state = {k: v.detach().float().cpu().contiguous() for k, v in model.image_encoder.vit.state_dict().items()}
    save_file(vit_state, str(image_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_json(image_dir / "config.json", timm_create_spec(model))

    full_state = model.state_dict()
    heads = {
        key: value.detach().float().cpu().contiguous()
        for key, value in full_state.items()
        if key.split(".", 1)[0] in HEAD_NAMES or key == LOGIT_SCALE_KEY
    }
    save_file(heads, str(folder / HEADS_FILE), metadata={"format": "pt", "projection": manifest.projection})

    _write_json(folder / MANIFEST_FILE, dataclasses.asdict(manifest))
    _write_json(folder / CONFIG_FILE, to_dict(loaded.config))
    (folder / README_FILE).write_text(render_readme(manifest, timm_create_spec(model)))
    return manifest


def render_readme(manifest: ExportManifest, timm_spec: dict[str, Any]) -> str:
    """The export's README: files, preprocessing and a plain-library code snippet."""
    image_global = (
        "tokens[:, 0]" if manifest.image_pool == GlobalPool.CLS.value
        else f"tokens[:, {manifest.num_prefix_tokens}:].mean(dim=1)"
    )
    if manifest.text_pool == GlobalPool.CLS.value:
        report_lines = 'report_embedding = project(states[:, 0], "report_proj")'
    else:
        report_lines = ('mask = encoded["attention_mask"][..., None].float()\n    '
                        'report_embedding = project((states * mask).sum(1) / mask.sum(1), "report_proj")')
    pool_words = {GlobalPool.CLS.value: "the CLS token (token 0)", GlobalPool.MEAN.value: "the mean"}
    size = manifest.image_size
    if "conv_patch_stem" in timm_spec:
        needs = ("The text encoder and heads load with plain transformers, safetensors and torch. The image encoder "
                 "is a timm ViT with mlip_dist's conv patch stem: build it with `embed_layer=functools.partial("
                 "mlip_dist.models.patch_stem.ConvPatchEmbed, width="
                 f"{timm_spec['conv_patch_stem']['width']})` (`mlip_dist` installed).")
        create_line = ('vit = timm.create_model(spec["timm_name"], **spec["create_kwargs"],\n'
                       '                        embed_layer=partial(ConvPatchEmbed, **spec["conv_patch_stem"])).eval()')
        stem_import = "from functools import partial\nfrom mlip_dist.models.patch_stem import ConvPatchEmbed\n"
    else:
        needs = "Everything loads with plain transformers, timm, safetensors and torch; `mlip_dist` is not needed."
        create_line = 'vit = timm.create_model(spec["timm_name"], **spec["create_kwargs"]).eval()'
        stem_import = ""
    return f"""# MLIP export

Exported by `python -m mlip_dist.export` from `{manifest.source_checkpoint}` (step {manifest.step}).
{needs}

## Files
- `text_encoder/`: the report encoder (BERT-style) and its tokenizer, a transformers folder.
- `image_encoder/model.safetensors`: the timm ViT `{timm_spec["timm_name"]}` without classification head;
  `image_encoder/config.json` holds the exact `timm.create_model` arguments:
  `{json.dumps(timm_spec["create_kwargs"])}`.
- `heads.safetensors`: projection heads `image_global_proj`, `patch_proj`, `report_proj`, `sentence_proj`
  ({manifest.projection}: {"`<name>.net.weight/bias`" if manifest.projection == "linear"
  else "`<name>.net.0` -> exact GELU -> `<name>.net.2`"}) into the shared {manifest.embed_dim}-d space,
  and `logit_scale.t` (the similarity scale is min(exp(t), max) = {manifest.logit_scale:.4f}).
  Every projected feature is L2-normalised.
- `export.json`: pooling, preprocessing constants and sizes; `mlip_config.json`: the full training config.

## Preprocessing
- Image: grayscale in [0, 1]; resize the whole image to {manifest.image_size}x{manifest.image_size} (as in
  training, the aspect ratio is not kept); normalise `(x - {manifest.image_mean}) / {manifest.image_std}`;
  repeat to {manifest.in_chans} channel(s): input shape (B, {manifest.in_chans}, {size}, {size}).
- Image features: `tokens = vit.forward_features(images)`; the global embedding is
  {pool_words[manifest.image_pool]} {"" if manifest.image_pool == "cls" else "of the patch tokens "}before
  `image_global_proj`; the patch tokens `tokens[:, {manifest.num_prefix_tokens}:]` (row-major patch order) go
  through `patch_proj`.
- Text: a report is its sentences joined with single spaces, tokenized once with special tokens and
  truncated to {manifest.max_length} tokens (the saved tokenizer's `model_max_length`). The report embedding is
  {pool_words[manifest.text_pool]} {"" if manifest.text_pool == "cls" else "over the attention mask "}of the
  last hidden states, then `report_proj`. A sentence embedding is the mean of the hidden states of the tokens
  whose first character lies inside that sentence (`return_offsets_mapping=True`; first
  {manifest.max_sentences} sentences), then `sentence_proj`.

## Code
```python
import json
import timm, torch, torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer
{stem_import}
root = "path/to/this/folder"
spec = json.load(open(f"{{root}}/image_encoder/config.json"))
{create_line}
vit.load_state_dict(load_file(f"{{root}}/image_encoder/model.safetensors"))
bert = AutoModel.from_pretrained(f"{{root}}/text_encoder").eval()  # its pooler is unused
tokenizer = AutoTokenizer.from_pretrained(f"{{root}}/text_encoder")
heads = load_file(f"{{root}}/heads.safetensors")

def project(x, name):
    if f"{{name}}.net.weight" in heads:  # linear head
        y = F.linear(x, heads[f"{{name}}.net.weight"], heads[f"{{name}}.net.bias"])
    else:  # mlp head: Linear-GELU-Linear
        y = F.gelu(F.linear(x, heads[f"{{name}}.net.0.weight"], heads[f"{{name}}.net.0.bias"]))
        y = F.linear(y, heads[f"{{name}}.net.2.weight"], heads[f"{{name}}.net.2.bias"])
    return F.normalize(y, dim=-1)

with torch.no_grad():
    tokens = vit.forward_features(images)  # images preprocessed as above
    image_embedding = project({image_global}, "image_global_proj")
    patch_embeddings = project(tokens[:, {manifest.num_prefix_tokens}:], "patch_proj")
    encoded = tokenizer([" ".join(sentences)], truncation=True, return_tensors="pt")
    states = bert(**encoded).last_hidden_state
    {report_lines}
similarity = image_embedding @ report_embedding.T
```
With `mlip_dist` installed, `mlip_dist.export.load_exported(root)` does all of this, sentences included.
"""


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it")


def _clear_stale_tmp(tmp_dir: Path) -> None:
    """Remove the leftover of an interrupted export, but never a folder holding anything else."""
    if not tmp_dir.exists():
        return
    ours = {TEXT_DIR, IMAGE_DIR, HEADS_FILE, MANIFEST_FILE, CONFIG_FILE, README_FILE}
    if not tmp_dir.is_dir() or not {p.name for p in tmp_dir.iterdir()} <= ours:
        raise ExportError(f"{tmp_dir} exists and is not an unfinished export; move it away (the export is built there)")
    shutil.rmtree(tmp_dir)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp_dir`` to ``out_dir``; an old ``out_dir`` is removed only afterwards."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # A fresh, uniquely named empty folder that the old export replaces (rename onto an empty dir).
        backup = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
        os.replace(out_dir, backup)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(backup)
    else:
        # rename(2) replaces an empty folder atomically.
        os.replace(tmp_dir, out_dir)


def export_run(
    checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False, verify: bool = True,
    select: str = "latest",
) -> ExportResult:
    """Export the checkpoint ``checkpoint`` to ``out_dir`` (see the module docstring for the layout).

    Guarantees: ``out_dir`` is either left untouched (on any error) or holds a complete export;
    with ``verify`` the export's features were checked against the training model's
    ``encode_image`` / ``encode_text`` (max abs difference <= ``VERIFY_ATOL``) before publishing.
    Raises ``CheckpointError`` for a missing or incomplete checkpoint, ``ExportError`` otherwise.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)  # before the (possibly long) load
    loaded = load_run(checkpoint, select=select)  # CheckpointError names the file and the reason
    try:
        tokenizer = load_tokenizer(loaded.config)
    except (OSError, ValueError) as err:
        raise ExportError(
            f"cannot load the run's tokenizer {loaded.config.model.text.tokenizer or loaded.config.model.text.path} "
            f"({err}); set model.text.tokenizer in {loaded.run_dir / 'config.json'} to its local folder"
        ) from err
    run_dir = loaded.run_dir.resolve()
    if out_dir.resolve() == run_dir or out_dir.resolve() in run_dir.parents:
        raise ExportError(f"--out {out_dir} would replace the run {loaded.run_dir} itself; choose another folder")
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    _clear_stale_tmp(tmp_dir)
    tmp_dir.mkdir(parents=True)
    try:
        logger.info("writing export of %s into %s", loaded.tag_dir, tmp_dir)
        manifest = write_export(loaded, tokenizer, tmp_dir)
        max_abs_diff = None
        if verify:
            max_abs_diff = verify_export(loaded.model, tmp_dir)
            logger.info("verified: max abs feature difference %.3g", max_abs_diff)
        _check_out_dir(out_dir, overwrite)  # someone may have written it meanwhile
        _publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, manifest=manifest, max_abs_diff=max_abs_diff)


class ExportedMLIP(nn.Module):
    """The encoder pair of an export: plain timm ViT + transformers encoder + projection heads.

    ``encode_image`` / ``encode_text`` return the same ``ImageFeatures`` / ``TextFeatures`` as
    ``MLIPModel`` (unmasked), computed from the exported files only.
    """

    vit: Any  # timm VisionTransformer
    text_model: Any  # transformers PreTrainedModel

    def __init__(self, vit: nn.Module, text_model: nn.Module, heads: dict[str, Projection], tokenizer: Any,
                 manifest: ExportManifest, config: MLIPConfig) -> None:
        super().__init__()
        self.vit = vit
        self.text_model = text_model
        self.heads = nn.ModuleDict(heads)
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.config = config
        self.register_buffer("logit_scale", torch.tensor(manifest.logit_scale))

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        tokens = self.vit.forward_features(images)
        n_prefix = self.manifest.num_prefix_tokens
        patch_tokens = tokens[:, n_prefix:]
        if self.manifest.image_pool == GlobalPool.CLS.value:
            global_embedding = tokens[:, 0]
        else:
            global_embedding = patch_tokens.mean(dim=1)
        batch, num_patches = patch_tokens.shape[:2]
        visible = torch.arange(num_patches, device=images.device).expand(batch, -1)
        return ImageFeatures(
            global_features=self.heads["image_global_proj"](global_embedding),
            patch_features=self.heads["patch_proj"](patch_tokens),
            visible_patch_idx=visible,
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sentence_spans: torch.Tensor,
                    sentence_mask: torch.Tensor) -> TextFeatures:
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.manifest.text_pool == GlobalPool.CLS.value:
            global_embedding = states[:, 0]
        else:
            global_embedding = masked_mean(states, attention_mask)
        mask = sentence_mask.bool()
        sentences = span_mean(states, sentence_spans, mask)
        return TextFeatures(
            report_features=self.heads["report_proj"](global_embedding),
            sentence_features=self.heads["sentence_proj"](sentences) * mask.unsqueeze(-1),
            sentence_mask=mask,
        )

    def tokenize(self, sentences_per_report: list[list[str]]) -> TokenizedReports:
        """Reports (lists of sentences) -> model inputs, exactly as in training."""
        return tokenize_with_spans(
            self.tokenizer, sentences_per_report, self.manifest.max_length, self.manifest.max_sentences
        )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ExportError(f"{path} not found: {path.parent} is not a complete MLIP export")
    return json.loads(path.read_text())


def load_exported(out_dir: str | Path, device: torch.device | str = "cpu") -> ExportedMLIP:
    """Rebuild the encoders of an export folder (eval mode) from its files alone."""
    import timm
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    root = Path(out_dir)
    manifest_data = _read_json(root / MANIFEST_FILE)
    if manifest_data.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(
            f"{root / MANIFEST_FILE}: export format {manifest_data.get('format_version')} is not "
            f"{EXPORT_FORMAT_VERSION}; re-export with this mlip_dist version"
        )
    manifest = ExportManifest(**manifest_data)
    config = from_dict(MLIPConfig, _read_json(root / CONFIG_FILE))
    spec = _read_json(root / IMAGE_DIR / "config.json")
    create_kwargs = dict(spec["create_kwargs"])
    if "conv_patch_stem" in spec:
        from functools import partial

        from mlip_dist.models.patch_stem import ConvPatchEmbed

        create_kwargs["embed_layer"] = partial(ConvPatchEmbed, width=int(spec["conv_patch_stem"]["width"]))
    vit: Any = timm.create_model(spec["timm_name"], **create_kwargs)
    vit.load_state_dict(load_file(str(root / IMAGE_DIR / WEIGHTS_FILE)), strict=True)
    text_dir = root / TEXT_DIR
    try:
        text_model = AutoModel.from_pretrained(str(text_dir), local_files_only=True, add_pooling_layer=False)
    except TypeError:  # not a BERT-family model: no pooler switch
        text_model = AutoModel.from_pretrained(str(text_dir), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(text_dir), local_files_only=True)

    head_state = load_file(str(root / HEADS_FILE))
    in_dims = {"image_global_proj": int(vit.embed_dim), "patch_proj": int(vit.embed_dim),
               "report_proj": int(text_model.config.hidden_size), "sentence_proj": int(text_model.config.hidden_size)}
    heads = {}
    for name in HEAD_NAMES:
        head = Projection(in_dims[name], manifest.embed_dim, ProjectionKind(manifest.projection))
        prefix = name + "."
        head.load_state_dict({k.removeprefix(prefix): v for k, v in head_state.items() if k.startswith(prefix)},
                             strict=True)
        heads[name] = head
    model = ExportedMLIP(vit, text_model, heads, tokenizer, manifest, config)
    return model.to(device).eval()


def verify_export(model: MLIPModel, folder: Path, atol: float = VERIFY_ATOL) -> float:
    """Max abs difference between ``model`` and the export in ``folder`` on fixed inputs.

    Compares unmasked global and patch image features on seeded random images and report and
    sentence features on fixed reports, tokenized with the exported tokenizer (whose ids must
    equal the training tokenizer's by construction). Raises ``ExportError`` above ``atol``.
    """
    try:
        exported = load_exported(folder)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{folder}: the export does not load back with timm/transformers ({err})") from err
    manifest = exported.manifest
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, manifest.in_chans, manifest.image_size, manifest.image_size, generator=generator)
    tokens = exported.tokenize(_VERIFY_REPORTS)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference_image = model.encode_image(images, mask_ratio=0.0)
            reference_text = model.encode_text(*tokens)
            image = exported.encode_image(images)
            text = exported.encode_text(*tokens)
    finally:
        model.train(was_training)
    pairs = {
        "image global": (image.global_features, reference_image.global_features),
        "image patch": (image.patch_features, reference_image.patch_features),
        "report": (text.report_features, reference_text.report_features),
        "sentence": (text.sentence_features, reference_text.sentence_features),
    }
    worst = 0.0
    for name, (got, want) in pairs.items():
        if got.shape != want.shape:
            raise ExportError(f"{folder}: exported {name} features have shape {tuple(got.shape)}, "
                              f"the training model {tuple(want.shape)}")
        diff = float((got - want).abs().max())
        if not math.isfinite(diff) or diff > atol:
            raise ExportError(f"{folder}: exported {name} features differ from the training model by {diff:.3g} "
                              f"(> {atol}); the export is not published")
        worst = max(worst, diff)
    return worst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlip_dist.export",
        description="Export an MLIP checkpoint as a transformers text encoder, a timm image encoder and "
        "safetensors projection heads.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, its checkpoints/ folder, or one step_NNNNNNNN tag folder")
    parser.add_argument("--select", choices=SELECTIONS, default="latest",
                        help="with a run or checkpoints folder: its latest complete checkpoint or the best by the "
                        "run's validation metric (train.best_metric)")
    parser.add_argument("--out", required=True, help="export folder (written atomically via <out>.tmp)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip reloading the export and comparing its features to the training model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success and 2 (with a one-line reason on stderr) on a user error."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = export_run(args.checkpoint, args.out, overwrite=args.overwrite, verify=args.verify,
                            select=args.select)
    except (CheckpointError, ExportError) as err:
        print(f"mlip_dist.export: error: {err}", file=sys.stderr)
        return 2
    note = "" if result.max_abs_diff is None else f" (verified, max abs difference {result.max_abs_diff:.2g})"
    print(f"exported {result.manifest.source_checkpoint} to {result.out_dir}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
