"""The options table and its readers agree (the Settings dataclass, config.env.example,
docs/configuration.md), and `resolve` builds Settings by precedence, in one process."""

import dataclasses
import types
import typing

import pytest

from embedfill import docs
from embedfill.errors import ConfigError
from embedfill.options import OPTIONS, VERBS
from embedfill.parser import build_parser
from embedfill.settings import Settings, resolve
from tests.conftest import ROOT

# The fields of Settings that no option declares, and the flag of each verb that sets it.
COMMAND_LINE_ONLY = {
    "limit": "--limit",
    "truncate": "--no-truncate",
    "retry_failed": "--retry-failed",
    "dry_run": "--dry-run",
    "no_wait": "--no-wait",
    "progress_interval": "--progress-interval",
}


def conforms(value, hint):
    """Whether `value` is of the annotated type `hint` (X, X | None, tuple[X, ...]); exactly: an
    int is not a float here, nor a bool an int."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item, _ = typing.get_args(hint)
        return isinstance(value, tuple) and all(conforms(part, item) for part in value)
    return value is None if hint is type(None) else type(value) is hint


def example_values():
    """ENV: value of each `# ENV=value` line of config.env.example."""
    lines = (ROOT / "config.env.example").read_text(encoding="utf-8").splitlines()
    pairs = [line.removeprefix("# ").split("=", 1) for line in lines if line.startswith("# ") and "=" in line]
    return {name: value for name, value in pairs if name.isupper() and " " not in name}


def test_the_options_table_the_settings_config_env_example_and_the_docs_agree(capsys):
    """One field per option, in the table's order and of its name, then the command-line-only
    fields; each field's default is the option's, of the field's type and what the option's
    parser makes of its own text; config.env.example's value of each option parses to the field's
    type; `python -m embedfill.docs --check` finds both generated files up to date."""
    fields = dataclasses.fields(Settings)
    assert [field.name for field in fields] == [option.dest for option in OPTIONS] + list(COMMAND_LINE_ONLY)
    hints = typing.get_type_hints(Settings)
    defaults = {field.name: field.default for field in fields}
    examples = example_values()
    for option in OPTIONS:
        hint, default = hints[option.dest], defaults[option.dest]
        assert default == option.default and type(default) is type(option.default), option.dest
        assert conforms(default, hint), f"{option.dest}: default {default!r} is not {hint}"
        if default is not None:
            parsed = option.parse(str(default))
            assert parsed == default and conforms(parsed, hint), f"{option.dest}: {default!r} parses to {parsed!r}"
        assert examples.get(option.env), f"{option.env} has no value in config.env.example"
        parsed = option.parse(examples[option.env])
        assert conforms(parsed, hint), f"{option.env}={examples[option.env]} parses to {parsed!r}, not {hint}"
    assert set(examples) == {option.env for option in OPTIONS}  # and nothing else
    for name, flag in COMMAND_LINE_ONLY.items():
        assert conforms(defaults[name], hints[name]), name
        own = [action.option_strings for verb in VERBS for action in build_parser(verb).own_actions]
        assert any(flag in names for names in own), flag
    assert docs.main(["--check"]) == 0, capsys.readouterr().out


def test_resolve_takes_a_flag_then_the_environment_then_config_env():
    file_values = {"ETL_WORKERS": "2", "ETL_BATCH_SIZE": "5", "ETL_TEXT_COLUMNS": " name, ,body "}
    environ = {"ETL_BATCH_SIZE": "7", "ETL_RPM": "", "ETL_FOLLOW": "yes"}
    settings = resolve({"batch_size": None, "rpm": None, "limit": 3}, environ, file_values)
    assert (settings.workers, settings.batch_size, settings.rpm) == (2, 7, None)  # file, environment, unset
    assert settings.text_columns == ("name", "body") and settings.follow is True and settings.limit == 3
    assert settings.progress_interval == 10.0 and settings.truncate is True and settings.model_name == settings.model
    assert resolve({"batch_size": 9}, environ, file_values).batch_size == 9
    with pytest.raises(ConfigError, match=r"^ETL_WORKERS='two' in the config.env is invalid: invalid literal"):
        resolve({}, {}, {"ETL_WORKERS": "two"})
    with pytest.raises(ConfigError) as missing:
        resolve({}, {}, {}, required=("table",))
    assert str(missing.value) == "ETL_TABLE is not set: set ETL_TABLE in config.env or the environment, or pass --table"


def test_settings_are_frozen_and_derive_the_token_limit_and_the_models_name():
    settings = resolve({"provider": "local", "progress_interval": 0.5}, {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.workers = 8
    assert settings.progress_interval == 0.5 and settings.model_name == "local-hashing"
    assert settings.input_token_limit == 8191  # the default model's
    assert dataclasses.replace(settings, max_input_tokens=100).input_token_limit == 100
    assert Settings(model="an-unknown-model").input_token_limit == 8191
