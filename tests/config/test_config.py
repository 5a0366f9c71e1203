"""Config: defaults, overrides, one-line errors for each class of mistake, Flower run_config."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from fedtune.config import (
    Config,
    ConfigError,
    from_run_config,
    load_config,
    parse_override,
    to_run_config,
    to_toml,
)
from fedtune.task import task_resources
from tests.conftest import REPO


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    default = load_config()
    file = tmp_path / "c.toml"
    file.write_text(to_toml(default))
    assert load_config(file) == default == Config()


def test_overrides_parse_toml_values_and_bare_strings():
    config = load_config(None, ["data.alpha=0.1", "data.dataset=bbc_news",
                                "model.hidden_sizes=[64, 32]", "run.name='x y'"])
    assert config.data.alpha == 0.1
    assert config.data.dataset == "bbc_news"
    assert config.model.hidden_sizes == [64, 32]
    assert config.run.name == "x y"


def test_run_config_round_trip_and_partial_run_config():
    config = load_config(None, ["data.alpha=0.3", "model.hidden_sizes=[8,4]",
                                "privacy.mode=none"])
    flat = to_run_config(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["model.hidden_sizes"] == "8,4"
    assert from_run_config(flat) == config
    assert from_run_config({"data.alpha": 0.2}).data.alpha == 0.2  # others keep defaults


def test_pyproject_declares_exactly_the_default_config():
    """`flwr run .` must start from the same defaults as `fedtune run`."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    flat = {f"{section}.{key}": value for section, values in declared.items()
            for key, value in values.items()}
    assert flat == to_run_config(Config()), "run: python scripts/sync_flwr_config.py"


def test_quickstart_file_is_the_default():
    assert load_config(REPO / "simulations" / "quickstart.toml") == Config()


@pytest.mark.parametrize("overrides, expected", [
    (["data.alpha=0"], "data.alpha = 0 is not allowed: must be a number > 0"),
    (["data.alpha=-1"], "data.alpha = -1 is not allowed: must be a number > 0"),
    (["data.num_clients=many"], "data.num_clients = 'many' is not allowed: must be an integer"),
    (["data.dataset=mnist"], "data.dataset = 'mnist' is not allowed: must be one of "
                             "'rotten_tomatoes', 'bbc_news', 'digits'"),
    (["data.colour=red"], "data.colour is not a config key: [data] allows dataset,"),
    (["magic.key=1"], "[magic] is not a config section: allowed are run, data,"),
    (["model.path=/does/not/exist"], "model.path = '/does/not/exist' is not allowed: must be a "
                                     "folder with a Hugging Face config.json"),
    (["run.rounds=0"], "run.rounds = 0 is not allowed: must be an integer >= 1"),
    (["strategy.fraction_train=1.5"], "strategy.fraction_train = 1.5 is not allowed"),
    (["model.hidden_sizes=[0]"], "model.hidden_sizes = [0] is not allowed: must be a list"),
    (["client.lr=true"], "client.lr = True is not allowed: must be a number > 0"),
    (["data.dataset=digits"], "data.dataset = 'digits' is not allowed with model.kind = 'hf'"),
    (["engine.backend=flower", "engine.ray_address=10.0.0.1:6379"],
     "engine.ray_address = '10.0.0.1:6379' is not allowed with engine.backend = 'flower': "
     "must be ''"),
    (["engine.backend=inprocess", "engine.client_timeout_s=5"],
     "engine.client_timeout_s = 5.0 is not allowed with engine.backend = 'inprocess'"),
    (["engine.num_actors=-1"], "engine.num_actors = -1 is not allowed: must be an integer >= 0"),
    (["engine.client_timeout_s=0"], "engine.client_timeout_s = 0 is not allowed: must be a number"),
    (["alpha=3"], "the key must be section.key"),
    (["data.alpha"], "must look like section.key=value"),
])
def test_each_config_error_is_one_line_naming_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, expected", [
    (["data.num_clients=5000", "data.max_examples=300"],
     "data.num_clients = 5000 is not allowed: must be <= 270"),
    (["data.partitioner=natural", "data.dataset=bbc_news", "model.kind=mlp"],
     "data.natural_key = '' is not allowed for data.dataset = 'bbc_news'"),
    (["data.partitioner=shards", "data.labels_per_client=3"],
     "data.labels_per_client = 3 is not allowed: must be <= 2"),
    (["data.partitioner=dirichlet", "data.num_clients=400", "data.alpha=0.05",
      "data.min_client_examples=20", "data.max_examples=4000", "model.kind=mlp"],
     "data.alpha = 0.05 with data.num_clients = 400"),
])
def test_data_dependent_errors_are_config_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        task_resources(load_config(None, overrides))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[data\nalpha = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)


def test_parse_override_keeps_strings_that_are_not_toml():
    assert parse_override("data.dataset=bbc_news") == ("data", "dataset", "bbc_news")
    assert parse_override("privacy.target=inf")[2] == float("inf")


def test_cli_prints_one_line_and_no_traceback_for_user_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedtune", "run", "--set", "data.alpha=-2",
         "--output", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    output = (result.stdout + result.stderr).strip()
    assert "Traceback" not in output
    assert output.splitlines() == [
        "fedtune: error: data.alpha = -2 is not allowed: must be a number > 0"
    ]
    assert not (tmp_path / "r").exists()  # nothing started
