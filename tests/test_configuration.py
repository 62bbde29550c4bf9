"""Config files, overrides, command line and JSON round trip."""

from __future__ import annotations

import textwrap

import ml_collections
import pytest

from jaxasr.configuration import (
    ConfigError,
    config_from_json,
    config_to_json,
    load_config,
    parse_train_args,
    selection_sets,
    selection_wer,
)

CONFIG = textwrap.dedent(
    """
    import ml_collections
    from ml_collections import config_dict

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.name = "demo"
        c.optimizer = ml_collections.ConfigDict()
        c.optimizer.peak_lr = 1e-3
        c.optimizer.warmup_steps = 100
        c.optimizer.betas = (0.9, 0.98)
        c.model = ml_collections.ConfigDict()
        c.model.scan_layers = False
        c.model.remat = None
        c.model.dropout = config_dict.placeholder(float)
        c.model.freeze = ("encoder", "embed")
        c.model.dims = [4, 8]
        c.data = ml_collections.ConfigDict()
        c.data.mixture = {"a": 0.5, "b": 0.5}
        c.data.batch_size = 8
        if arg == "big":
            c.data.batch_size = 64
        return c
    """
)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(CONFIG)
    return str(path)


def test_overrides_of_each_type(config_file):
    c = load_config(
        config_file,
        [
            "seed=7",
            "name=other run",
            "optimizer.peak_lr=3e-4",
            "optimizer.warmup_steps=1e3",
            "optimizer.betas=0.8, 0.99",
            "model.scan_layers=TRUE",
            "model.remat=dots_saveable",
            "model.dropout=0.1",
            "model.freeze=('decoder',)",
            "model.dims=[1, 2, 3]",
            "data.mixture={'x': 1.0}",
            "--config.data.batch_size=16",
        ],
    )
    assert c.seed == 7 and type(c.seed) is int
    assert c.name == "other run"
    assert c.optimizer.peak_lr == 3e-4 and type(c.optimizer.peak_lr) is float
    assert c.optimizer.warmup_steps == 1000 and type(c.optimizer.warmup_steps) is int
    assert c.optimizer.betas == (0.8, 0.99)
    assert c.model.scan_layers is True
    assert c.model.remat == "dots_saveable"
    assert c.model.dropout == 0.1
    assert c.model.freeze == ("decoder",)
    assert c.model.dims == [1, 2, 3]
    assert c.data.mixture.to_dict() == {"x": 1.0}
    assert c.data.batch_size == 16


@pytest.mark.parametrize("text,expected", [("false", False), ("0", False), ("1", True), ("True", True)])
def test_bool_spellings(config_file, text, expected):
    assert load_config(config_file, [f"model.scan_layers={text}"]).model.scan_layers is expected


def test_comma_separated_strings_and_none(config_file):
    c = load_config(config_file, ["model.freeze=encoder,decoder,", "model.remat=None"])
    assert c.model.freeze == ("encoder", "decoder")
    assert c.model.remat is None


def test_unknown_key_suggests(config_file):
    with pytest.raises(ConfigError) as e:
        load_config(config_file, ["optimizer.peak_lrr=1"])
    assert "unknown config key 'optimizer.peak_lrr'" in str(e.value)
    assert "did you mean 'optimizer.peak_lr'" in str(e.value)
    with pytest.raises(ConfigError, match="'optimizer.peak_lr'"):
        load_config(config_file, ["optimiser.peak_lr=1"])  # typo in the parent
    with pytest.raises(ValueError, match="unknown config key 'seed.x'"):
        load_config(config_file, ["seed.x=1"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optimizer.peak_lr=fast", "expected float, got 'fast'"),
        ("optimizer.warmup_steps=1.5", "expected int, got '1.5'"),
        ("model.scan_layers=maybe", "expected bool, got 'maybe'"),
        ("model.dropout=high", "expected float, got 'high'"),
        ("data.mixture=[1]", "expected dict"),
        ("optimizer.peak_lr=None", "expected float"),
    ],
)
def test_wrong_type_names_key_and_type(config_file, override, expected):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(config_file, [override])
    assert f"config key {key!r}" in str(e.value)
    assert expected in str(e.value)


def test_get_config_arg(config_file):
    assert load_config(config_file).data.batch_size == 8
    assert load_config(config_file + ":big").data.batch_size == 64


def test_locked_after_load(config_file):
    c = load_config(config_file)
    with pytest.raises(AttributeError):
        c.optimizer.peak_lrr = 1.0
    c.optimizer.peak_lr = 2.0  # existing fields stay writable
    assert c.optimizer.peak_lr == 2.0


def test_missing_file_and_bad_override_form(tmp_path, config_file):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(config_file, ["seed"])


def test_parse_train_args(config_file, tmp_path):
    config, workdir, extra = parse_train_args(
        ["--config", config_file + ":big", "--config.optimizer.peak_lr", "5e-4",
         "--config.seed=3", "--workdir", str(tmp_path / "w"), "--config.model.scan_layers",
         "--", "--xla_flag"]
    )
    assert config.optimizer.peak_lr == 5e-4
    assert config.seed == 3
    assert config.model.scan_layers is True
    assert config.data.batch_size == 64
    assert workdir == tmp_path / "w"
    assert extra == ["--xla_flag"]


def test_parse_train_args_rejects_typos(config_file, tmp_path):
    with pytest.raises(ConfigError, match="did you mean '--workdir'"):
        parse_train_args(["--config", config_file, "--workdri", str(tmp_path)])
    with pytest.raises(ConfigError, match="did you mean 'optimizer.peak_lr'"):
        parse_train_args(["--config", config_file, "--config.optimizer.peak_lrr=1",
                          "--workdir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--workdir"):
        parse_train_args(["--config", config_file])  # required


def test_json_round_trip(config_file):
    c = load_config(config_file, ["model.dropout=0.25"])
    text = config_to_json(c)
    back = config_from_json(text)
    assert back.to_dict() == {**c.to_dict(), "model": {**c.model.to_dict(), "dims": (4, 8)}}
    assert back.optimizer.betas == (0.9, 0.98)
    assert back.model.remat is None
    with pytest.raises(AttributeError):
        back.new_key = 1  # locked
    assert config_to_json(back) == text


def test_json_rejects_unserializable():
    c = ml_collections.ConfigDict({"a": {"b": object()}})
    with pytest.raises(ConfigError, match="'a.b'"):
        config_to_json(c)


def test_selection_sets_one_or_mean():
    names = ["pharmacy_dev", "banking_dev", "general_test"]
    assert selection_sets("", names) == ["pharmacy_dev"]
    assert selection_sets("banking_dev", names) == ["banking_dev"]
    both = selection_sets("pharmacy_dev+banking_dev", names)
    assert selection_wer({"pharmacy_dev": 10.0, "banking_dev": 20.0, "general_test": 90.0}, both) == 15.0
    with pytest.raises(ConfigError, match=r"config.eval.best_set: 'bank_dev' is not one of the eval sets"):
        selection_sets("pharmacy_dev+bank_dev", names)


def test_trainer_checks_best_set_first(tmp_path):
    """A misspelled eval.best_set fails before any model or data is loaded."""
    from jaxasr.training.trainer import default_config, train

    config = default_config()
    config.model.init = str(tmp_path / "no-such-model")
    config.eval.sets = {"dev": {"path": "x"}}
    config.eval.best_set = "dev+test"
    with pytest.raises(ConfigError, match="'test' is not one of the eval sets"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
