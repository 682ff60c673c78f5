"""Typed configuration: the one source of truth for every hyper-parameter.

Each part of the system owns one dataclass here; ``MLIPConfig`` composes them.
Defaults are the METHOD.md defaults. Configs are plain data: they are loaded
from YAML/JSON, overridden from the command line with dotted keys
(``--train.lr 1e-4``) and validated before any process group starts.
Nothing here is ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class IntegrityMode(str, enum.Enum):
    """Semantic integrity estimation (METHOD.md, Losses 2)."""

    RELATIVE = "relative"
    LEARNED = "learned"
    NONE = "none"


class GlobalPool(str, enum.Enum):
    CLS = "cls"
    MEAN = "mean"


class PatchStem(str, enum.Enum):
    """How the image encoder turns a patch into a token: timm's linear patch embedding (the paper's
    ViT) or a small CNN applied to each patch on its own (ours; models/patch_stem.py)."""

    LINEAR = "linear"
    CONV = "conv"


class ProjectionKind(str, enum.Enum):
    LINEAR = "linear"
    MLP = "mlp"


class PositionEmbedding(str, enum.Enum):
    """Decoder position embedding: fixed 2-D sin-cos (MAE) or learned."""

    SINCOS = "sincos"
    LEARNED = "learned"


class ZeroStage(int, enum.Enum):
    ZERO0 = 0
    ZERO1 = 1
    ZERO2 = 2
    ZERO3 = 3


@dataclass
class ImageEncoderConfig:
    """A timm Vision Transformer by name plus overrides (METHOD.md, Encoders)."""

    name: str = "vit_base_patch16_224"
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int | None = None  # timm embed_dim override
    depth: int | None = None
    num_heads: int | None = None
    checkpoint: str | None = None  # local timm checkpoint (.safetensors / .pth / .bin); never downloaded
    mask_ratio: float = 0.5
    pool: GlobalPool = GlobalPool.CLS
    drop_path_rate: float = 0.0
    stem: PatchStem = PatchStem.LINEAR
    stem_width: int = 16  # channels of the conv stem's first stage (doubled at each later stage)


@dataclass
class TextEncoderConfig:
    """A transformers BERT-style encoder from a local folder or a config (random init)."""

    path: str | None = None  # local transformers model folder (weights + config)
    tokenizer: str | None = None  # local tokenizer folder; defaults to `path`
    # Random-init architecture, used when `path` is None.
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_length: int = 256  # tokens per report, [CLS] and [SEP] included: tokenisation in training and evaluation
    pool: GlobalPool = GlobalPool.CLS
    freeze_layers: int = 0  # freeze embeddings + the first k layers (CPU demo)
    dropout: float | None = None  # hidden + attention dropout override; None keeps the model's own


@dataclass
class DecoderConfig:
    """Light MAE-style decoder for masked image prediction (METHOD.md, Losses 4)."""

    width: int = 384
    depth: int = 4
    num_heads: int = 6
    norm_pix_loss: bool = True
    pos_embed: PositionEmbedding = PositionEmbedding.SINCOS


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256
    projection: ProjectionKind = ProjectionKind.LINEAR
    gradient_checkpointing: bool = False
    max_sentences: int = 16


@dataclass
class LossConfig:
    """Loss weights and solver settings (METHOD.md, Losses 1-4)."""

    lambda_global: float = 1.0
    lambda_local: float = 1.0
    lambda_reconstruction: float = 1.0
    logit_scale_init: float = 2.659260036932778  # log(1 / 0.07)
    logit_scale_max: float = 100.0
    integrity: IntegrityMode = IntegrityMode.RELATIVE
    integrity_clip_max: float = 2.0
    ot_epsilon: float = 0.05
    ot_max_iter: int = 50
    ot_tol: float = 1e-4
    local_temperature: float = 0.1
    local_negatives: int | None = None  # k hardest negatives per row/column; None = all
    ot_chunk_pairs: int = 4096  # image/report pairs solved at once (memory bound)


@dataclass
class DataConfig:
    shards: str = "shards/synthetic"  # folder with dataset.json
    train_split: str = "train"
    val_split: str = "validate"
    # Image size, report length (tokens) and sentences per report are the model's: model.image.image_size,
    # model.text.max_length, model.max_sentences.
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False
    augment: bool = True
    seed: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/mlip"
    global_batch_size: int = 64
    micro_batch_size: int | None = None  # per rank; default global_batch_size / world_size
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 100
    max_steps: int = 1000
    stop_at_step: int | None = None  # end this job after this step (checkpointed); the schedule keeps max_steps
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16
    zero_stage: ZeroStage = ZeroStage.ZERO2
    offload: bool = False
    save_every: int = 500
    keep_last: int = 3
    save_consolidated: bool = True  # also write <tag>/model.safetensors (fp32, for evaluation/export)
    log_every: int = 10
    image_log_every: int = 200
    max_bad_steps: int = 5
    collective_timeout_s: int = 600
    seed: int = 0


@dataclass
class MLIPConfig:
    preset: str | None = None  # model preset (paper | small | tiny) applied under the `model` section
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config file or override names an unknown field or has a bad value."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert plain YAML/JSON data to the annotated type, or raise ConfigError naming `where`."""
    if isinstance(annotation, str):
        raise ConfigError(f"{where}: unresolved annotation {annotation!r}")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if dataclasses.is_dataclass(annotation):
        if isinstance(annotation, type) and isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=where)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            choices = ", ".join(str(m.value) for m in annotation)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from nested plain data; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + k for k in sorted(unknown))}; "
            f"valid: {', '.join(sorted(names))}"
        )
    kwargs = {
        key: _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key) for key, value in data.items()
    }
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable nested dict (enums as their values)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, enum.Enum):
            return value.value
        return value

    return plain(config)


def _parse_scalar(text: str) -> Any:
    """Parse a command-line override value as YAML scalar data (never code)."""
    import yaml

    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` or ``--key.sub value`` pairs to nested plain data."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        item = overrides[i].removeprefix("--")
        if "=" in item:
            key, value = item.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override {overrides[i]!r} has no value")
            key, value = item, overrides[i + 1]
            i += 2
        pairs.append((key, value))
    for key, value in pairs:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MLIPConfig:
    """Load a YAML or JSON config, apply overrides, validate; raises ConfigError naming the field."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, list(overrides or []))
    preset = data.get("preset")
    if preset is not None:
        from mlip_dist.models.presets import get_preset

        try:
            base = to_dict(get_preset(preset))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"preset: {err}") from None
        data["model"] = _merge(base, data.get("model") or {})
    config = from_dict(MLIPConfig, data)
    validate(config)
    return config


def validate(config: MLIPConfig) -> None:
    """Semantic checks that types alone cannot express."""
    m, loss, t = config.model, config.loss, config.train
    checks = [
        (0.0 <= m.image.mask_ratio < 1.0, "model.image.mask_ratio must be in [0, 1)"),
        (m.image.image_size % m.image.patch_size == 0, "model.image.image_size must be a multiple of patch_size"),
        (m.image.stem == PatchStem.LINEAR or m.image.checkpoint is None,
         "model.image.checkpoint needs model.image.stem=linear (a timm checkpoint has no conv stem)"),
        (m.image.stem_width > 0, "model.image.stem_width must be positive"),
        (m.embed_dim > 0, "model.embed_dim must be positive"),
        (loss.ot_epsilon > 0, "loss.ot_epsilon must be positive"),
        (loss.local_temperature > 0, "loss.local_temperature must be positive"),
        (loss.logit_scale_max > 0, "loss.logit_scale_max must be positive"),
        (loss.local_negatives is None or loss.local_negatives >= 1, "loss.local_negatives must be >= 1"),
        (t.global_batch_size > 0, "train.global_batch_size must be positive"),
        (t.lr > 0, "train.lr must be positive"),
        (t.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"),
        (t.keep_last >= 1, "train.keep_last must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
