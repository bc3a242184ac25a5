import pytest

from juap.commands.train_classifier import TrainClassifierConfig
from juap.errors import ConfigError
from juap.runtime.config import apply_overrides, from_dict, load_config, to_dict


def test_defaults_round_trip(tmp_path):
    cfg = TrainClassifierConfig()
    again = from_dict(TrainClassifierConfig, to_dict(cfg))
    assert again == cfg


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\ndata:\n  image_size: 32\n")
    cfg = load_config(TrainClassifierConfig, p, ["train.lr=0.1", "classifier.options={widths: [8, 16, 32]}"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1 and cfg.data.image_size == 32
    assert cfg.classifier.options == {"widths": [8, 16, 32]}


def test_typo_suggests_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'. Did you mean 'train.epochs'\?"):
        from_dict(TrainClassifierConfig, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="Did you mean 'classifier'"):
        from_dict(TrainClassifierConfig, {"clasifier": {}})


def test_bad_values_name_field_value_and_allowed():
    with pytest.raises(
        ConfigError,
        match=r"data.name: unknown data set 'imagenett'. Did you mean 'imagenet'\?.*"
        r"Known data sets: chestxray, folder, imagenet, intel, photos, synthetic",
    ):
        from_dict(TrainClassifierConfig, {"data": {"name": "imagenett", "root": "x"}})
    with pytest.raises(ConfigError, match="train.epochs must be an integer, got 'ten'"):
        from_dict(TrainClassifierConfig, {"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="train.lr = 0.0 is out of range"):
        from_dict(TrainClassifierConfig, {"train": {"lr": 0}})
    with pytest.raises(ConfigError, match="NaN"):
        from_dict(TrainClassifierConfig, {"train": {"lr": float("nan")}})


def test_override_syntax_errors(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainClassifierConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainClassifierConfig, bad)
