"""finetune.config: defaults < YAML < overrides, strict YAML scalars, type coercion and clear errors."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from conftest import REPO

from finetune.config import load_config, parse_config, save_config, yaml_load
from finetune.errors import ConfigError

CONFIGS = REPO / "recipes" / "configs"


@dataclass
class Inner:
    lr: float = 1.0e-3
    steps: int = 10
    name: str = "inner"
    tags: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    seed: int = 1
    enabled: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    output_dir: str = "runs/x"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    extras: dict[str, float] = field(default_factory=dict)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> Outer:
    return load_config(Outer, write(tmp_path, text), overrides)


# --- precedence and scalars ---------------------------------------------------------------------------------

def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "seed: 2\ninner:\n  steps: 20\n  name: from_yaml\n")
    cfg = load_config(Outer, path, ["inner.steps=30", "enabled=true"])
    assert cfg.seed == 2  # YAML over default
    assert cfg.inner.steps == 30  # override over YAML
    assert cfg.inner.name == "from_yaml"
    assert cfg.enabled is True
    assert cfg.inner.lr == 1.0e-3 and cfg.output_dir == "runs/x"  # untouched defaults
    assert load_config(Outer) == Outer()


def test_yaml_exponent_without_dot_is_a_float():
    assert yaml_load("2e-5") == 2e-5 and isinstance(yaml_load("2e-5"), float)
    assert yaml_load("x: 1E3") == {"x": 1000.0}
    assert yaml_load("x: 1") == {"x": 1} and isinstance(yaml_load("1"), int)


def test_float_field_coerces_yaml_exponent_and_int(tmp_path):
    cfg = load_text(tmp_path, "inner:\n  lr: 2e-5\n")
    assert cfg.inner.lr == 2e-5 and type(cfg.inner.lr) is float
    cfg = load_config(Outer, overrides=["inner.lr=3"])
    assert cfg.inner.lr == 3.0 and type(cfg.inner.lr) is float


def test_only_true_false_are_booleans():
    assert yaml_load("[no, yes, on, off, true, False]") == ["no", "yes", "on", "off", True, False]


def test_no_stays_a_string_in_a_literal_field(tmp_path):
    cfg = load_text(tmp_path, "mixed_precision: no\n")
    assert cfg.mixed_precision == "no"
    assert load_config(Outer, overrides=["mixed_precision=no"]).mixed_precision == "no"


def test_bool_field_rejects_yes(tmp_path):
    with pytest.raises(ConfigError, match=r"enabled: expected true or false, got 'yes'"):
        load_text(tmp_path, "enabled: yes\n")


def test_int_field_accepts_integral_float_and_rejects_fraction(tmp_path):
    cfg = load_text(tmp_path, "inner:\n  steps: 1e3\n")
    assert cfg.inner.steps == 1000 and type(cfg.inner.steps) is int
    with pytest.raises(ConfigError, match=r"inner\.steps: expected an integer, got 1\.5"):
        load_text(tmp_path, "inner:\n  steps: 1.5\n")
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(Outer, overrides=["seed=true"])  # a bool is not an int


def test_optional_field_takes_null_or_value():
    assert load_config(Outer, overrides=["limit=null"]).limit is None
    assert load_config(Outer, overrides=["limit=5"]).limit == 5
    with pytest.raises(ConfigError, match="limit: expected an integer"):
        load_config(Outer, overrides=["limit=abc"])


def test_empty_override_unsets_an_optional_field_and_is_refused_elsewhere():
    assert load_config(Outer, overrides=["limit=5", "limit="]).limit is None  # `key=` is `key:` in YAML: null
    with pytest.raises(ConfigError, match=r"inner\.name needs a value \(str\); it cannot be empty"):
        load_config(Outer, overrides=["inner.name="])
    assert load_config(Outer, overrides=["inner.name=''"]).inner.name == ""  # an empty string, when meant


def test_integers_are_yaml_1_2_not_octal_or_base_60():
    assert load_config(Outer, overrides=["seed=0x10"]).seed == 16
    assert load_config(Outer, overrides=["seed=1_000"]).seed == 1000
    for raw in ("010", "1:30"):  # YAML 1.1 would read 8 and 90
        with pytest.raises(ConfigError, match=f"seed: expected an integer, got '{raw}'"):
            load_config(Outer, overrides=[f"seed={raw}"])


def test_str_field_given_a_number_says_to_quote_it(tmp_path):
    with pytest.raises(ConfigError, match=r"inner\.name: expected a string, got 5 \(int\); quote it"):
        load_text(tmp_path, "inner:\n  name: 5\n")
    assert load_text(tmp_path, "inner:\n  name: '5'\n").inner.name == "5"


def test_dict_field_coerces_values():
    cfg = load_config(Outer, overrides=["extras={a: 1, b: 2e-1}"])
    assert cfg.extras == {"a": 1.0, "b": 0.2}
    assert all(type(v) is float for v in cfg.extras.values())


# --- errors -------------------------------------------------------------------------------------------------

def test_unknown_top_level_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key sede; did you mean seed\?"):
        load_text(tmp_path, "sede: 3\n")


def test_unknown_nested_key_suggests_with_its_prefix():
    with pytest.raises(ConfigError, match=r"unknown config key inner\.stesp; did you mean inner\.steps\?"):
        load_config(Outer, overrides=["inner.stesp=3"])


def test_unknown_key_without_a_close_match_lists_known_keys():
    with pytest.raises(ConfigError, match="known keys: lr, steps, name, tags"):
        load_config(Outer, overrides=["inner.zzzzzz=3"])


def test_wrong_literal_value_suggests_a_choice(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "mixed_precision: bf61\n")
    message = str(info.value)
    assert "mixed_precision: 'bf61' is not one of 'no', 'bf16', 'fp16'" in message
    assert "did you mean 'bf16'?" in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\ninner:\n  steps: [1, 2\nenabled: true\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    message = str(info.value)
    assert str(path) in message and "is not valid YAML" in message
    assert "line 4" in message  # where the unclosed flow sequence is detected


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_text(tmp_path, "- a\n- b\n")


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_text(tmp_path, "# nothing\n") == Outer()


def test_malformed_override_key():
    with pytest.raises(ConfigError, match=r"must look like key\.sub=value"):
        load_config(Outer, overrides=["inner..steps=3"])


# --- save / parse -------------------------------------------------------------------------------------------

def test_save_then_load_round_trips(tmp_path):
    cfg = Outer(seed=7, enabled=True, mixed_precision="no", output_dir="runs/yes", limit=3,
                inner=Inner(lr=2e-5, steps=1000, name="on", tags=["x", "no", "1.5"]), extras={"w": 0.5})
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(Outer, path) == cfg
    # Other tools read config.yaml with YAML 1.1 rules (bare no / on are booleans there): the strings stay strings.
    plain = yaml.safe_load(path.read_text())
    assert plain["mixed_precision"] == "no" and plain["output_dir"] == "runs/yes"
    assert plain["inner"]["name"] == "on" and plain["inner"]["tags"] == ["x", "no", "1.5"]
    assert plain["enabled"] is True and plain["inner"]["lr"] == 2e-5 and plain["inner"]["steps"] == 1000


def test_save_then_load_round_trips_strings_that_look_like_exponent_floats(tmp_path):
    # Library bug: yaml.safe_dump (YAML 1.1 rules) writes the string "1e5" unquoted; the strict loader
    # (YAML 1.2 floats) reads it back as the float 100000.0, so the saved config no longer loads.
    cfg = Outer(output_dir="1e5", inner=Inner(name="2e-5"))
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(Outer, path) == cfg


def test_parse_config_with_config_equals_and_list_override(tmp_path):
    path = write(tmp_path, "seed: 3\n")
    cfg = parse_config(Outer, [f"--config={path}", "inner.tags=[x, y]", "inner.name=z"])
    assert cfg.seed == 3
    assert cfg.inner.tags == ["x", "y"]
    assert cfg.inner.name == "z"


def test_parse_config_with_separate_config_argument(tmp_path):
    path = write(tmp_path, "inner:\n  steps: 4\n")
    cfg = parse_config(Outer, ["--config", str(path), "seed=9"])
    assert (cfg.seed, cfg.inner.steps) == (9, 4)


def test_parse_config_without_arguments_gives_defaults():
    assert parse_config(Outer, []) == Outer()


@pytest.mark.parametrize("argv", [["positional"], ["--seed=3"], ["--config"]])
def test_parse_config_rejects_bad_arguments(argv):
    with pytest.raises(ConfigError):
        parse_config(Outer, argv)


def test_parse_config_bare_positional_message():
    with pytest.raises(ConfigError, match=r"cannot read argument 'train\.yaml'"):
        parse_config(Outer, ["train.yaml"])


def test_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Outer, ["seed=3", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "  seed: int = 1\n" in out
    assert "  mixed_precision: no|bf16|fp16 = 'bf16'\n" in out
    assert re.search(r"^  limit: int \| (None|NoneType) = None$", out, re.M)
    assert "  inner.lr: float = 0.001\n" in out
    assert "  inner.tags: list[str] = ['a']\n" in out


# --- shipped configs ----------------------------------------------------------------------------------------

def recipe_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.relative_to(CONFIGS).parts[0] != "accelerate")


def accelerate_configs() -> list[Path]:
    return sorted((CONFIGS / "accelerate").glob("*.yaml"))


# configs/<folder>/ -> recipes/<name>.py where they differ (a recipes/compress.py would shadow the compress package).
RECIPE_OF_CONFIGS = {"compress": "compression"}


def import_recipe(name: str):
    name = RECIPE_OF_CONFIGS.get(name, name)
    path = REPO / "recipes" / f"{name}.py"
    assert path.is_file(), f"configs/{name}/ has no recipe recipes/{name}.py"
    module_name = f"_tuneforge_test_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # get_type_hints resolves the recipe's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_shipped_recipe_configs_are_found():
    assert recipe_configs(), f"no recipe YAML under {CONFIGS}"
    assert accelerate_configs(), f"no accelerate YAML under {CONFIGS / 'accelerate'}"


@pytest.mark.parametrize("path", recipe_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_recipe_config_loads(path):
    module = import_recipe(path.parent.name)
    cfg = load_config(module.Config, path)
    assert isinstance(cfg, module.Config)


@pytest.mark.parametrize("path", accelerate_configs(), ids=lambda p: p.name)
def test_shipped_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.num_processes >= 1
