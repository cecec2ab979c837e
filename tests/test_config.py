"""Config: YAML files, `--set` coercion, clear errors, and the precedence defaults < yaml < --set < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdqn.cli import build_parser, config_from_args
from fastdqn.config import FIELDS, Config, coerce, from_dict, load_yaml, parse_set
from fastdqn.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def train_config(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_every_field_is_documented():
    for name, f in FIELDS.items():
        assert f.metadata.get("help", "").strip(), f"Config.{name} has no help text"


@pytest.mark.parametrize("name", ["cartpole.yaml", "acrobot.yaml"])
def test_shipped_yaml_files_load_into_a_valid_config(name):
    values = load_yaml(CONFIGS / name)
    assert set(values) <= set(FIELDS)
    cfg = from_dict(values, where=name)
    assert cfg.env_id == values["env_id"]


def test_yaml_values_are_coerced_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-4\nbuffer_size: 1e4\nhidden_sizes: [64, 32]\ndouble_dqn: yes\n")
    cfg = from_dict(load_yaml(path))
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.buffer_size == 10_000 and isinstance(cfg.buffer_size, int)
    assert cfg.hidden_sizes == [64, 32] and cfg.double_dqn is True


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rat: 0.1\n", "did you mean 'learning_rate'"),
        ("batch_size: lots\n", "batch_size"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("gamma: [0.9\n", "not valid YAML"),
    ],
)
def test_bad_yaml_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        from_dict(load_yaml(path), where=str(path))
    assert "\n" not in str(info.value)


def test_missing_yaml_file_names_the_path():
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_yaml("nope.yaml")


def test_empty_yaml_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert from_dict(load_yaml(path)) == Config()


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("batch_size", "64", 64),
        ("total_steps", "5e4", 50_000),
        ("total_steps", "50_000", 50_000),
        ("learning_rate", "3e-4", 3e-4),
        ("learning_rate", "0.001", 0.001),
        ("gamma", "1", 1.0),
        ("hidden_sizes", "[256,256]", [256, 256]),
        ("hidden_sizes", "[ 64 ]", [64]),
        ("hidden_sizes", "120,84", [120, 84]),  # the brackets may be left out on the command line
        ("hidden_sizes", "64", [64]),
        ("double_dqn", "true", True),
        ("double_dqn", "False", False),
        ("loss", "mse", "mse"),
        ("env_id", "Acrobot-v1", "Acrobot-v1"),
        ("env_id", "123", "123"),  # a string field keeps the text as typed
        ("solved_return", "-100", -100.0),
        ("solved_return", "null", None),  # null: the env's own solve line
    ],
)
def test_set_values_are_coerced_to_the_field_type(name, text, value):
    coerced = coerce(name, text)
    assert coerced == value and type(coerced) is type(value)


@pytest.mark.parametrize(
    "name, text",
    [
        ("batch_size", "abc"),
        ("batch_size", "2.5"),
        ("batch_size", "true"),
        ("learning_rate", "fast"),
        ("learning_rate", "[1]"),
        ("double_dqn", "maybe"),
        ("double_dqn", "1"),
        ("hidden_sizes", "[a, b]"),
        ("hidden_sizes", "a,b"),
        ("hidden_sizes", "1.5,2"),
        ("hidden_sizes", "[1.5]"),
        ("loss", "l1"),
        ("target_update", "sometimes"),
        ("solved_return", "high"),
    ],
)
def test_wrong_types_name_the_key_and_expected_type(name, text):
    with pytest.raises(ConfigError, match=f"config key '{name}' expects") as info:
        coerce(name, text)
    assert repr(text) in str(info.value) or text in str(info.value)


def test_parse_set():
    assert parse_set(["learning_rate=3e-4", "hidden-sizes=[1,2]", " gamma = 0.9 "]) == {
        "learning_rate": "3e-4",
        "hidden_sizes": "[1,2]",
        "gamma": "0.9",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["learning_rate"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["=3"])


def test_unknown_set_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate' in --set; did you mean 'learning_rate'"):
        train_config("--set", "learnig_rate=0.1")
    with pytest.raises(ConfigError, match="train --help"):
        train_config("--set", "zzzzzz=1")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gamma": 1.5}, "gamma must be in \\[0, 1\\]"),
        ({"tau": 0.0}, "tau must be in \\(0, 1\\]"),
        ({"num_envs": 0}, "num_envs must be >= 1"),
        ({"learning_rate": -1e-3}, "learning_rate must be a finite number > 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number > 0"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0"),
        ({"lr_end": float("inf")}, "lr_end must be a finite number > 0"),
        ({"adam_eps": 0.0}, "adam_eps must be > 0"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"epsilon_start": 2.0}, "epsilon_start must be in \\[0, 1\\]"),
        ({"batch_size": 512, "buffer_size": 100}, "lower batch_size or raise buffer_size"),
        ({"hidden_sizes": []}, "hidden_sizes must be a non-empty list"),
        ({"hidden_sizes": [64, 0]}, "hidden_sizes must be a non-empty list"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
        ({"epsilon_step_factor": 0.0}, "epsilon_step_factor must be in \\(0, 1\\]"),
    ],
)
def test_out_of_range_values_are_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        Config().updated(**changes)


def test_updated_returns_a_validated_copy():
    base = Config(learning_rate=1e-3, num_envs=1)
    changed = base.updated(learning_rate="3e-4", num_envs="4")
    assert (changed.learning_rate, changed.num_envs) == (3e-4, 4)
    assert (base.learning_rate, base.num_envs) == (1e-3, 1)  # the original is untouched
    with pytest.raises(ConfigError, match="did you mean 'num_envs'"):
        base.updated(num_env=4)


def test_precedence_defaults_then_yaml_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.01\nbatch_size: 16\ngamma: 0.95\nnum_envs: 2\n")
    assert train_config().learning_rate == Config().learning_rate
    from_yaml = train_config("--config", str(path))
    assert (from_yaml.learning_rate, from_yaml.batch_size, from_yaml.gamma) == (0.01, 16, 0.95)
    assert from_yaml.adam_eps == Config().adam_eps  # keys the file does not name keep their defaults
    with_set = train_config("--config", str(path), "--set", "learning_rate=0.02", "--set", "batch_size=32")
    assert (with_set.learning_rate, with_set.batch_size, with_set.gamma) == (0.02, 32, 0.95)
    with_flags = train_config(
        "--learning-rate",
        "0.03",
        "--config",
        str(path),
        "--set",
        "learning_rate=0.02",
        "--envs",
        "8",
        "--no-double-dqn",
        "--set",
        "double_dqn=true",
    )
    assert (with_flags.learning_rate, with_flags.batch_size, with_flags.num_envs) == (0.03, 16, 8)
    assert with_flags.double_dqn is False


def test_flags_cover_every_field_and_are_coerced():
    cfg = train_config(
        "--env",
        "Acrobot-v1",
        "--envs",
        "4",
        "--hidden-sizes",
        "[32,32]",
        "--compile",
        "--amp",
        "--loss",
        "mse",
        "--learning-rate",
        "3e-4",
        "--total-steps",
        "1e4",
    )
    assert (cfg.env_id, cfg.num_envs, cfg.hidden_sizes, cfg.compile, cfg.amp, cfg.loss) == (
        "Acrobot-v1",
        4,
        [32, 32],
        True,
        True,
        "mse",
    )
    assert (cfg.learning_rate, cfg.total_steps) == (3e-4, 10_000)
    args = vars(build_parser().parse_args(["train"]))
    assert set(FIELDS) <= set(args)


def test_a_bad_flag_value_is_a_config_error():
    with pytest.raises(ConfigError, match="config key 'batch_size' expects int, got 'big'"):
        train_config("--batch-size", "big")
    with pytest.raises(ConfigError, match="gamma must be in"):
        train_config("--gamma", "2")


@pytest.mark.parametrize(
    "env_id, line",
    [
        ("CartPole-v1", 475.0),
        ("Acrobot-v1", -100.0),
        ("MountainCar-v0", -110.0),
        ("LunarLander-v3", 200.0),
        ("ALE/Breakout-v5", None),
        ("CartPole-v0", None),
    ],
)
def test_the_solve_line_is_the_envs_unless_the_config_sets_one(env_id, line):
    assert Config(env_id=env_id).solve_line == line  # Atari and unlisted envs have none: scores only
    assert Config(env_id=env_id, solved_return=12.5).solve_line == 12.5
