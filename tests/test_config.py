"""Typed config: loading, overrides, validation errors that name the field."""

import json

import pytest

from mlip_dist.config import ConfigError, IntegrityMode, MLIPConfig, ZeroStage, load_config, to_dict


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
