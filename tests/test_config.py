"""Config overrides are validated; config files and CLI flags land in the right keys."""

import dataclasses
import json

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


def old_layout(cfg: Config) -> dict:
    """``cfg.to_dict()`` as seglib wrote it before the config pass (the layout of the first
    bundled student.pt): flat student inference settings, three ``ema_decay`` and two settings
    nothing read."""
    d = cfg.to_dict()
    st = d["student"]
    head, refine = st.pop("head"), st.pop("refine")
    st.update(head_iters=head["iters"], size_prior=head["size_prior"], denoise_iters=head["denoise_iters"])
    st.update(denoise_radius=head["denoise_radius"], denoise_dilations=head["denoise_dilations"])
    st.update(smooth_iters=refine["smooth_iters"], guide_scale=refine["guide_scale"])
    for section, key in [("train", "weight_average_decay"), ("distill", "loss_norm_decay")]:
        d[section]["ema_decay"] = d[section].pop(key)
    d["autoencoder"]["ema_decay"] = d["autoencoder"].pop("loss_norm_decay")
    d["data"].update(eval_images=8, eval_size=256)
    return d


def recipe_student_config() -> Config:
    from seglib.recipes import STUDENT_DUBAI_CPU

    return Config.from_dict(STUDENT_DUBAI_CPU)


def test_upgrade_config_rewrites_the_old_layout_and_leaves_the_current_one_alone():
    from seglib.config import upgrade_config

    cfg = recipe_student_config()
    old = old_layout(cfg)
    frozen = json.dumps(old, sort_keys=True)
    new = upgrade_config(old)
    assert json.dumps(old, sort_keys=True) == frozen  # the input is not modified
    assert new["student"]["head"]["iters"] == 1 and new["student"]["refine"] == {"smooth_iters": 0, "guide_scale": 4}
    assert new["train"]["weight_average_decay"] == 0.995 and "ema_decay" not in new["train"]
    assert "eval_images" not in new["data"]
    assert Config.from_dict(new) == Config.from_dict(old) == cfg
    assert upgrade_config(cfg.to_dict()) == cfg.to_dict()


def test_old_names_in_overrides_still_work():
    args = build_parser().parse_args(["--set", "student.head_iters=2", "--set", "train.ema_decay=0.9"])
    cfg = config_from_args(args)
    assert cfg.student.head["iters"] == 2 and cfg.train.weight_average_decay == 0.9
    args = build_parser().parse_args(["--ema-decay", "0.5", "--ae-ema-decay", "0.7"])  # the old flags
    cfg = config_from_args(args)
    assert (cfg.distill.loss_norm_decay, cfg.autoencoder.loss_norm_decay) == (0.5, 0.7)


def test_a_checkpoint_in_the_old_layout_loads_the_same_student(tmp_path):
    import torch

    from seglib.checkpoint import model_checkpoint, save_atomic
    from seglib.models import load_model
    from seglib.models.student import StudentModelConfig, StudentSegmenter

    cfg = recipe_student_config()
    torch.manual_seed(0)
    student = StudentSegmenter(StudentModelConfig.from_config(cfg)).eval()
    save_atomic(model_checkpoint("student", old_layout(cfg), student.state_dict()), tmp_path / "student.pt")
    loaded = load_model(tmp_path / "student.pt")
    assert loaded.config == student.config
    assert (loaded.head.iters, loaded.head.size_prior, loaded.head.denoise_dilations) == (1, 3.0, (1, 2, 4))
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x, 4)["probs"], student(x, 4)["probs"])


def test_student_overrides_are_checked_against_the_config_they_override():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'student.head.itres'.*did you mean 'student.head.iters'"
    ):
        Config.from_dict({"student": {"head": {"itres": 2}}})
    with pytest.raises(ConfigError, match="'student.refine.guide_scale' expects int"):
        Config.from_dict({"student": {"refine": {"guide_scale": "two"}}})
    cfg = Config.from_dict({"student": {"refine": {"guide_scale": 4}, "head": {"denoise_dilations": [1, 2]}}})
    assert cfg.student.refine == {"smooth_iters": 0, "guide_scale": 4}  # merged into the defaults
    assert cfg.student.head == {"denoise_dilations": (1, 2)}


def test_validate_names_the_bad_value():
    with pytest.raises(ConfigError, match="data.size must be a positive multiple of 16"):
        Config.from_dict({"data": {"size": 100}}).validate()
    with pytest.raises(ConfigError, match="unknown refinement lane"):
        Config.from_dict({"randomize": {"lanes": ["fast", "blur"]}}).validate()
    with pytest.raises(ConfigError, match=r"randomize.ks must lie in 2..16"):
        Config.from_dict({"randomize": {"ks": [1, 4]}}).validate()
    assert Config().validate() == Config()


def test_the_settings_page_is_generated_from_the_dataclasses(tmp_path):
    """docs/settings.md lists every setting with its default and comment; a setting added,
    removed or changed in seglib/config.py without regenerating the page fails here."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("docs_settings", ROOT / "docs" / "settings.py")
    settings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings)
    page = (ROOT / "docs" / "settings.md").read_text()
    assert page == settings.render(), "docs/settings.md is out of date; run `python docs/settings.py`"

    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            yield from leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]

    flat = list(leaves(Config()))
    assert all(f"| `{key}` |" in page for key in flat) and page.count("\n| `") == len(flat)
    settings.OUT = tmp_path / "settings.md"  # the check notices a stale page
    settings.OUT.write_text(page.replace("| `train.lr` | `0.002` |", "| `train.lr` | `0.001` |"))
    assert settings.main(["--check"]) == 1


def test_checkpoints_from_before_keep_a_full_resolution_learned_lane():
    """A checkpoint written before ``refine.learned_scale`` existed (the bundled student) loads
    with the learned lane at full resolution, as it was trained; new configs use half."""
    from seglib.checkpoint import load_checkpoint
    from seglib.config import upgrade_config
    from seglib.paths import BUNDLED_MODEL

    assert Config().model.refine.learned_scale == 2
    assert load_checkpoint(BUNDLED_MODEL)["config"]["model"]["refine"]["learned_scale"] == 1
    assert upgrade_config({"model": {"refine": {"learned_width": 8}}}) == {"model": {"refine": {"learned_width": 8}}}
