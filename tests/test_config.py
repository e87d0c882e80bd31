"""Config overrides are validated; config files and CLI flags land in the right keys."""

import pytest

from seglib.config import Config, ConfigError, apply_overrides, load_config_file, parse_set
from seglib.train import build_parser, config_from_args


def test_defaults_and_round_trip():
    cfg = Config()
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_key_and_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*did you mean 'train.steps'"):
        Config.from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        Config.from_dict({"modle": {}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'train.steps' expects int, got str"):
        Config.from_dict({"train": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="'train.amp' expects a bool"):
        Config.from_dict({"train": {"amp": 1}})
    with pytest.raises(ConfigError, match="'randomize.ks' expects a list"):
        Config.from_dict({"randomize": {"ks": 4}})


def test_int_accepted_for_float_and_list_for_tuple():
    cfg = Config.from_dict({"train": {"lr": 1}, "randomize": {"ks": [4, 8]}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.randomize.ks == (4, 8)


def test_config_file_get_config_and_CONFIG(tmp_path):
    f = tmp_path / "a.py"
    f.write_text("def get_config():\n    return {'train': {'steps': 7}}\n")
    assert load_config_file(f) == {"train": {"steps": 7}}
    g = tmp_path / "b.py"
    g.write_text("from seglib.config import Config\nCONFIG = Config()\nCONFIG.train.steps = 9\n")
    assert load_config_file(g)["train"]["steps"] == 9


def test_config_file_without_entry_point(tmp_path):
    f = tmp_path / "empty.py"
    f.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="neither get_config\\(\\) nor CONFIG"):
        load_config_file(f)


def test_cli_precedence(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("def get_config():\n    return {'train': {'steps': 7, 'lr': 0.5}}\n")
    args = build_parser().parse_args(["--config", str(f), "--set", "train.lr=0.25", "--steps", "3", "--amp", "0"])
    cfg = config_from_args(args)
    assert cfg.train.steps == 3 and cfg.train.lr == 0.25 and cfg.train.amp is False


def test_cli_rejects_typo_in_set():
    args = build_parser().parse_args(["--set", "loss.smothness=0.1"])
    with pytest.raises(ConfigError, match="loss.smoothness"):
        config_from_args(args)


def test_parse_set_literals():
    assert parse_set(["a.b=3", "a.c=[1,2]", "d=hello"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "hello"}
    with pytest.raises(ConfigError):
        parse_set(["novalue"])


def test_apply_overrides_requires_dict():
    with pytest.raises(ConfigError):
        apply_overrides(Config(), {"train": 3})


def test_config_file_that_raises(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("def get_config():\n    return {'train': {'steps': undefined_name}}\nCONFIG = get_config()\n")
    with pytest.raises(ConfigError, match="failed to run: NameError"):
        load_config_file(f)
