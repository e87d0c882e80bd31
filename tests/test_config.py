"""Config overrides are validated; config files and CLI flags land in the right keys."""

import dataclasses

import pytest

from seglib.config import Config, ConfigError, apply_overrides, load_config_file, parse_set
from seglib.train_distill import build_parser, config_from_args


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


def test_the_contract_flags_set_their_settings():
    """The training contract's flags, each to its setting (the old names --ema-decay and
    --ae-ema-decay included)."""
    args = build_parser().parse_args(["--ema-decay", "0.5", "--ae-ema-decay", "0.7"])
    cfg = config_from_args(args)
    assert (cfg.distill.loss_norm_decay, cfg.autoencoder.loss_norm_decay) == (0.5, 0.7)
    flags = "--synthetic --steps 3 --amp 1 --seed 4 --checkpoint_dir d --grad-accum 2 --disable-multires "
    flags += "--student-dims 32,24,16 --student-depths 1,1,0 --student-norm batch --consistency-weight 0.25 "
    flags += "--cluster-iters 2 --disable-autoencoder --ae-lambda 0.5 --ae-blur-sigma 2 --ae-grad-weight 0.1 "
    flags += "--ae-detach-backbone 1"
    cfg = config_from_args(build_parser().parse_args(flags.split()))
    t, st, ae = cfg.train, cfg.student, cfg.autoencoder
    assert cfg.data.synthetic and (t.steps, t.amp, t.seed, t.checkpoint_dir, t.grad_accum) == (3, True, 4, "d", 2)
    assert not st.multires and (st.dims, st.depths, st.norm) == ((32, 24, 16), (1, 1, 0), "batch")
    assert (cfg.distill.consistency_weight, cfg.distill.cluster_iters) == (0.25, 2)
    assert not ae.enabled and (ae.lambda_recon, ae.blur_sigma, ae.grad_weight, ae.detach_backbone) == (
        0.5,
        2,
        0.1,
        True,
    )


def test_the_trainer_has_the_contract_flags_and_few_others():
    """``python -m seglib.train --help``: every flag of the training contract (as the README
    documents it) and at most 10 others, ``--config`` and ``--set`` among them; every other
    setting goes through ``--set``."""
    contract = "--synthetic --steps --amp --seed --checkpoint_dir --grad-accum --disable-multires "
    contract += "--student-dims --student-depths --student-norm --consistency-weight --ema-decay --cluster-iters "
    contract += "--disable-autoencoder --ae-lambda --ae-ema-decay --ae-blur-sigma --ae-grad-weight --ae-detach-backbone"
    listed = {flag for action in build_parser()._actions for flag in action.option_strings} - {"-h", "--help"}
    assert set(contract.split()) <= listed
    others = listed - set(contract.split())
    assert {"--config", "--set"} <= others and len(others) <= 10, sorted(others)


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
        Config.from_dict({"model": {"refine": {"lane": "blur"}}}).validate()
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


def test_the_bundled_student_keeps_its_full_resolution_learned_lane():
    """The bundled student was trained before the learned lane went to half resolution: its
    config says so (new configs use half)."""
    from seglib.checkpoint import load_checkpoint
    from seglib.paths import BUNDLED_MODEL

    assert Config().model.refine.learned_scale == 2
    assert load_checkpoint(BUNDLED_MODEL)["config"]["model"]["refine"]["learned_scale"] == 1


def test_every_setting_is_read_by_the_package(tmp_path, monkeypatch, one_thread):
    """Each leaf setting of ``Config`` is read outside seglib/config.py (its validation and
    ``to_dict`` do not count) by one training run that takes every branch a setting steers: a
    student distilled on a folder with masks from a teacher trained first, the probe on, and the
    two models loaded and run on both lanes that read settings. A setting that nothing reads
    fails here by name."""
    import dataclasses
    import os
    import sys

    import torch

    import seglib.config as config
    from seglib.models import load_model
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS
    from seglib.training.run import run

    reads: set[tuple[str, str]] = set()
    skip = {os.path.basename(config.__file__), "dataclasses.py", "copy.py"}

    def recording(cls):
        original = cls.__getattribute__

        def getattribute(self, name):
            if not name.startswith("__"):
                frame = sys._getframe(1)
                while frame is not None and os.path.basename(frame.f_code.co_filename) in skip - {"config.py"}:
                    frame = frame.f_back  # dataclasses.asdict / replace on behalf of their caller
                if frame is not None and frame.f_code.co_filename != config.__file__:
                    reads.add((cls.__name__, name))
            return original(self, name)

        return getattribute

    classes = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    for cls in classes:
        monkeypatch.setattr(cls, "__getattribute__", recording(cls))

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(sub, type) and dataclasses.is_dataclass(sub):
                yield from leaves(sub, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name, (cls.__name__, f.name)

    cfg = Config.from_dict(
        {
            "stage": "student",
            "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
            "student": {"size": "tiny", "dims": [32, 24, 16], "depths": [1, 1, 0], "norm": "batch"},
            "data": {
                "synthetic": False,
                "data_dir": str(SAMPLE_IMAGES),
                "include": ["*t*"],
                "exclude": ["*005*"],
                "mask_dir": str(SAMPLE_MASKS),
                "mask_ignore": [5, 255],
                "size": 32,
                "batch_size": 2,
                "downscale": 4,
            },
            "distill": {"teacher_steps": 1},
            "probe": {"every": 1},
            "train": {"steps": 2, "warmup": 1, "checkpoint_dir": str(tmp_path), "weight_average_decay": 0.9},
        }
    )
    run(cfg)
    rgb = torch.rand(1, 3, 64, 64)
    for path in (tmp_path / "teacher" / "teacher.pt", tmp_path / "student.pt"):
        model = load_model(path)
        with torch.no_grad():
            model(rgb, 3), model(rgb, 3, lane="learned")
    unread = [key for key, attribute in leaves(Config) if attribute not in reads]
    assert not unread, f"settings nothing reads: {unread}"
    assert len(list(leaves(Config))) <= 85  # the config of what ships stays small
