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
import math
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


class ValMetric(str, enum.Enum):
    """Validation metrics (training/validation.py) that can choose the best checkpoint (``train.best_metric``)."""

    I2R_R1 = "val/i2r_R@1"
    I2R_R5 = "val/i2r_R@5"
    I2R_R10 = "val/i2r_R@10"
    R2I_R1 = "val/r2i_R@1"
    R2I_R5 = "val/r2i_R@5"
    R2I_R10 = "val/r2i_R@10"
    ZERO_SHOT_AUC = "val/zero_shot_auc"
    LOSS_TOTAL = "val/loss/total"
    LOSS_GLOBAL = "val/loss/global"
    LOSS_LOCAL = "val/loss/local"


class ZeroStage(int, enum.Enum):
    ZERO0 = 0
    ZERO1 = 1
    ZERO2 = 2
    ZERO3 = 3


class Precision(str, enum.Enum):
    """Training precision: bf16 where the hardware supports it (auto), or forced."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


SEED_MAX = 2**32 - 1  # numpy's limit; torch and random accept it too


def _number(value: float | None) -> str:
    """A bound as people write it: 1, 0.5, 1e-06, 4294967295."""
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:g}"


@dataclass(frozen=True)
class Range:
    """The valid values of a number: ``ge``/``gt`` a lower bound (inclusive/exclusive), ``le``/``lt`` an upper one.

    Declared next to each numeric config field (``bounded``) and each numeric command-line option
    (``mlip_dist.cli_types``). Floats must also be finite: NaN and infinities are never in range.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __post_init__(self) -> None:
        if (self.ge is not None and self.gt is not None) or (self.le is not None and self.lt is not None):
            raise TypeError(f"{self!r}: give at most one lower and one upper bound")

    @property
    def low(self) -> float | None:
        return self.ge if self.ge is not None else self.gt

    @property
    def high(self) -> float | None:
        return self.le if self.le is not None else self.lt

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, finite: bool = False) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``; with ``finite``: ``a finite number > 0``."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            text = f"in {'[' if self.ge is not None else '('}{low}, {high}{']' if self.le is not None else ')'}"
        elif self.low is not None:
            text = f"{'>=' if self.ge is not None else '>'} {low}"
        elif self.high is not None:
            text = f"{'<=' if self.le is not None else '<'} {high}"
        else:
            return "a finite number" if finite else "any number"
        return f"a finite number {text}" if finite else text

    def problem(self, value: float) -> str | None:
        """None when ``value`` is in range, else ``out of range: must be ...``."""
        if value in self:
            return None
        return f"out of range: must be {self.describe(finite=isinstance(value, float))}"


RANGE = "range"  # the dataclass field metadata key of a numeric field's Range


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A config field with its valid range: ``save_every: int = bounded(500, ge=1)``. None, where the
    annotation allows it, is always valid (it means "the default behaviour"); ``validate`` checks the rest."""
    return field(default=default, metadata={RANGE: Range(ge=ge, gt=gt, le=le, lt=lt)})


@dataclass
class ImageEncoderConfig:
    """A timm Vision Transformer by name plus overrides (METHOD.md, Encoders)."""

    name: str = "vit_base_patch16_224"
    image_size: int = bounded(224, ge=1)
    patch_size: int = bounded(16, ge=1)  # image_size must be a multiple; a power of two >= 4 for stem conv
    in_chans: int = bounded(3, ge=1)
    width: int | None = bounded(None, ge=1)  # timm embed_dim override
    depth: int | None = bounded(None, ge=1)
    num_heads: int | None = bounded(None, ge=1)
    checkpoint: str | None = None  # local timm checkpoint (.safetensors / .pth / .bin); never downloaded
    mask_ratio: float = bounded(0.5, ge=0.0, lt=1.0)
    pool: GlobalPool = GlobalPool.CLS
    drop_path_rate: float = bounded(0.0, ge=0.0, lt=1.0)
    stem: PatchStem = PatchStem.LINEAR
    stem_width: int = bounded(16, ge=1)  # channels of the conv stem's first stage (doubled at each later stage)


@dataclass
class TextEncoderConfig:
    """A transformers BERT-style encoder from a local folder or a config (random init)."""

    path: str | None = None  # local transformers model folder (weights + config)
    tokenizer: str | None = None  # local tokenizer folder; defaults to `path`
    # Random-init architecture, used when `path` is None.
    hidden_size: int = bounded(768, ge=1)
    num_layers: int = bounded(12, ge=1)
    num_heads: int = bounded(12, ge=1)
    intermediate_size: int = bounded(3072, ge=1)
    vocab_size: int = bounded(30522, ge=1)
    # Tokens per report, [CLS] and [SEP] included (so at least 3): tokenisation in training and evaluation.
    max_length: int = bounded(256, ge=3)
    pool: GlobalPool = GlobalPool.CLS
    freeze_layers: int = bounded(0, ge=0)  # freeze embeddings + the first k layers (CPU demo)
    dropout: float | None = bounded(None, ge=0.0, lt=1.0)  # hidden + attention dropout override; None keeps the model's own


@dataclass
class DecoderConfig:
    """Light MAE-style decoder for masked image prediction (METHOD.md, Losses 4)."""

    width: int = bounded(384, ge=1)
    depth: int = bounded(4, ge=1)
    num_heads: int = bounded(6, ge=1)
    norm_pix_loss: bool = True
    pos_embed: PositionEmbedding = PositionEmbedding.SINCOS


@dataclass
class ModelConfig:
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = bounded(256, ge=1)
    projection: ProjectionKind = ProjectionKind.LINEAR
    gradient_checkpointing: bool = False
    max_sentences: int = bounded(16, ge=1)


@dataclass
class LossConfig:
    """Loss weights and solver settings (METHOD.md, Losses 1-4)."""

    lambda_global: float = bounded(1.0, ge=0.0)  # at least one of the three lambdas is > 0
    lambda_local: float = bounded(1.0, ge=0.0)
    lambda_reconstruction: float = bounded(1.0, ge=0.0)
    logit_scale_init: float = bounded(2.659260036932778)  # log(1 / 0.07); any finite t
    logit_scale_max: float = bounded(100.0, gt=0.0)
    integrity: IntegrityMode = IntegrityMode.RELATIVE
    integrity_clip_max: float = bounded(2.0, gt=0.0)
    ot_epsilon: float = bounded(0.05, gt=0.0)
    ot_max_iter: int = bounded(50, ge=1)
    ot_tol: float = bounded(1e-4, gt=0.0)
    local_temperature: float = bounded(0.1, gt=0.0)
    local_negatives: int | None = bounded(None, ge=1)  # k hardest negatives per row/column; None = all
    ot_chunk_pairs: int = bounded(4096, ge=1)  # image/report pairs solved at once (memory bound)
    # Exactly ot_max_iter Sinkhorn iterations, no convergence test in the loop: no host sync in the solver
    # (ot_tol unused; the final marginal error is still logged). Off: stop at ot_tol, checked every 10.
    ot_fixed_iterations: bool = False
    ot_compile: bool = False  # the solver's steps through torch.compile (inductor: gcc on CPU, triton on GPU)


@dataclass
class DataConfig:
    # Folder with dataset.json, or a remote base that dataset.json and the shard names are resolved against:
    # http(s)://host/mimic/, s3://bucket/mimic, gs://bucket/mimic (fsspec: pip install -e .[remote]) or a
    # command template "pipe:aws s3 cp s3://bucket/mimic/{} -" ({} = the file name). See data/remote.py.
    shards: str = "shards/synthetic"
    train_split: str = "train"
    val_split: str = "validate"
    # Image size, report length (tokens) and sentences per report are the model's: model.image.image_size,
    # model.text.max_length, model.max_sentences.
    num_workers: int = bounded(2, ge=0)
    # Samples shuffled together: windows of this many samples of each epoch's shard-shuffled global order
    # (data/loader.py); 0 or 1: shard order only.
    shuffle_buffer: int = bounded(1000, ge=0)
    resampled: bool = False
    augment: bool = True
    seed: int = bounded(0, ge=0, le=SEED_MAX)
    # Remote shards are fetched whole into a cache folder and read from there (local folders are read in
    # place). None: a folder in the system temp folder, shared by the ranks and workers of a node.
    cache_dir: str | None = None
    cache_max_bytes: int = bounded(64 * 2**30, ge=1)  # least recently used shards evicted beyond this
    fetch_timeout_s: float = bounded(60.0, gt=0.0)  # a connection or one read stalled longer is retried
    fetch_retries: int = bounded(3, ge=0, le=20)  # exponential back-off; then the shard's positions are lost


@dataclass
class TrainConfig:
    output_dir: str = "runs/mlip"
    global_batch_size: int = bounded(64, ge=1)
    micro_batch_size: int | None = bounded(None, ge=1)  # per rank; default global_batch_size / world_size
    lr: float = bounded(1e-4, gt=0.0)
    min_lr: float = bounded(1e-6, ge=0.0)  # <= lr
    weight_decay: float = bounded(0.05, ge=0.0)
    beta1: float = bounded(0.9, ge=0.0, lt=1.0)
    beta2: float = bounded(0.98, ge=0.0, lt=1.0)
    warmup_steps: int = bounded(100, ge=0)
    # Multipliers of lr for the encoders' own weights; the projections, decoder and logit scale keep lr. A
    # pretrained encoder is fine-tuned at a fraction of the rate of the new layers on top of it (docs/RESULTS.md).
    image_encoder_lr_scale: float = bounded(1.0, gt=0.0, le=10.0)
    text_encoder_lr_scale: float = bounded(1.0, gt=0.0, le=10.0)
    max_steps: int = bounded(1000, ge=1)
    # End this job after this step (<= max_steps; checkpointed); the schedule keeps max_steps.
    stop_at_step: int | None = bounded(None, ge=1)
    grad_clip: float = bounded(1.0, ge=0.0)  # 0: no clipping (DeepSpeed gradient_clipping)
    precision: Precision = Precision.AUTO
    # torch.compile the image and text encoders (nn.Module.compile: in place, parameter names unchanged);
    # the first steps are slower while inductor compiles (gcc on the CPU, triton on GPUs).
    compile: bool = False
    # AdamW's fused implementation (one kernel per tensor and step; torch's CPU and GPU kernels). Off: torch's
    # single-tensor loop, for a device without a fused AdamW kernel.
    fused_adamw: bool = True
    # The ZeRO layout comes from --deepspeed_config (ds_configs/zeroN.json, its one source of truth). Set this
    # only to assert the stage: a value that contradicts the DeepSpeed config is refused before launch.
    zero_stage: ZeroStage | None = None
    offload: bool = False
    save_every: int = bounded(500, ge=1)
    keep_last: int = bounded(3, ge=1)  # the best checkpoint (best_metric) is kept besides these
    # Validation on data.val_split every eval_every steps and at the end (0: never), on its first
    # eval_max_samples samples; the checkpoint with the best best_metric is kept as checkpoints/best.
    eval_every: int = bounded(500, ge=0)
    eval_max_samples: int = bounded(1000, ge=1)
    best_metric: ValMetric = ValMetric.I2R_R10
    save_consolidated: bool = True  # also write <tag>/model.safetensors (fp32, for evaluation/export)
    log_every: int = bounded(10, ge=1)
    image_log_every: int = bounded(200, ge=0)  # 0: no heat-map images
    max_bad_steps: int = bounded(5, ge=1)
    collective_timeout_s: int = bounded(600, ge=1)
    seed: int = bounded(0, ge=0, le=SEED_MAX)


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


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, ``(T, False)`` for ``T``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def declared_range(cls: type, name: str) -> Range:
    """The Range declared on numeric field ``name`` of config dataclass ``cls`` (TypeError if none)."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get(RANGE)
    if not isinstance(found, Range):
        raise TypeError(f"{cls.__name__}.{name} is numeric but declares no valid range: use bounded(...)")
    return found


def _check_fields(section: Any, prefix: str) -> None:
    """Type, range and enum checks of every field of ``section`` and its sub-sections, from the declarations."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        where = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(section, f.name)
        kind, optional = _unwrap_optional(hints[f.name])
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            if not isinstance(value, kind):
                raise ConfigError(f"{where}: expected a mapping of {kind.__name__} fields, got {value!r}")
            _check_fields(value, where)
            continue
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{where} = None is not allowed")
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            try:
                kind(value)
            except (TypeError, ValueError):
                choices = ", ".join(str(m.value) for m in kind)
                raise ConfigError(f"{where} = {value!r} is not one of {choices}") from None
        elif kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where} = {value!r}: expected true/false")
        elif kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ConfigError(f"{where} = {value!r}: expected {'a number' if kind is float else 'an integer'}")
            problem = declared_range(type(section), f.name).problem(value)
            if problem is not None:
                raise ConfigError(f"{where} = {value!r} is {problem}")
        elif kind is str:
            if not isinstance(value, str):
                raise ConfigError(f"{where} = {value!r}: expected a string")
        else:
            raise TypeError(f"{where}: validate() does not know the field type {kind!r}")


def validate(config: MLIPConfig) -> None:
    """Refuse a bad config before launch, naming the dotted field, its value and the valid values.

    First every field of every section against its declaration (type; Range for numbers, NaN and
    infinities refused; the member values for enums), then the rules that tie fields together.
    """
    _check_fields(config, "")
    m, loss, t = config.model, config.loss, config.train
    image, text, decoder = m.image, m.text, m.decoder
    patch = image.patch_size
    checks = [
        (image.image_size % patch == 0,
         f"model.image.image_size = {image.image_size} must be a multiple of model.image.patch_size = {patch}"),
        (image.stem == PatchStem.LINEAR or (patch >= 4 and patch & (patch - 1) == 0),
         f"model.image.patch_size = {patch} must be a power of two >= 4 with model.image.stem = conv"),
        (image.stem == PatchStem.LINEAR or image.checkpoint is None,
         "model.image.checkpoint needs model.image.stem=linear (a timm checkpoint has no conv stem)"),
        (image.width is None or image.num_heads is None or image.width % image.num_heads == 0,
         f"model.image.width = {image.width} must be a multiple of model.image.num_heads = {image.num_heads}"),
        (text.path is not None or text.hidden_size % text.num_heads == 0,
         f"model.text.hidden_size = {text.hidden_size} must be a multiple of model.text.num_heads = "
         f"{text.num_heads}"),
        (text.path is not None or text.freeze_layers <= text.num_layers,
         f"model.text.freeze_layers = {text.freeze_layers} must be <= model.text.num_layers = {text.num_layers}"),
        (decoder.width % decoder.num_heads == 0,
         f"model.decoder.width = {decoder.width} must be a multiple of model.decoder.num_heads = "
         f"{decoder.num_heads}"),
        (loss.lambda_global > 0 or loss.lambda_local > 0 or loss.lambda_reconstruction > 0,
         "loss.lambda_global, loss.lambda_local and loss.lambda_reconstruction are all 0: nothing to train"),
        (t.min_lr <= t.lr, f"train.min_lr = {t.min_lr!r} must be <= train.lr = {t.lr!r}"),
        (t.stop_at_step is None or t.stop_at_step <= t.max_steps,
         f"train.stop_at_step = {t.stop_at_step} must be <= train.max_steps = {t.max_steps}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
