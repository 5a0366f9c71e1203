"""Config: defaults, overrides, one-line errors for each class of mistake, Flower run_config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import warnings

import pytest

from fedtune.config import (
    Config,
    ConfigError,
    ConfigWarning,
    from_run_config,
    keys_without_effect,
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
    config = load_config(None, ["data.partitioner=dirichlet", "data.alpha=0.1",
                                "data.dataset=bbc_news", "model.kind=mlp",
                                "model.hidden_sizes=[64, 32]", "run.name='x y'"])
    assert config.data.alpha == 0.1
    assert config.data.dataset == "bbc_news"
    assert config.model.hidden_sizes == [64, 32]
    assert config.run.name == "x y"


def test_run_config_round_trip_and_partial_run_config():
    config = load_config(None, ["data.partitioner=dirichlet", "data.alpha=0.3",
                                "model.kind=mlp", "data.dataset=digits",
                                "model.hidden_sizes=[8,4]", "privacy.mode=none"])
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


# --- keys with no effect ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides, expected", [
    (["model.hidden_sizes=[256,128]"],
     "model.hidden_sizes = [256, 128] is not allowed with model.kind = 'hf': only model.kind = "
     "'mlp' uses it"),
    (["client.local_epochs=3"],
     "client.local_epochs = 3 is not allowed with client.local_steps = 8: only "
     "client.local_steps = 0 uses it"),
    (["data.alpha=0.1"], "data.alpha = 0.1 is not allowed with data.partitioner = 'natural': "
                         "only data.partitioner = 'dirichlet' or 'inner_dirichlet' uses it"),
    (["privacy.target_epsilon=4"], "privacy.target_epsilon = 4.0 is not allowed with "
                                   "privacy.mode = 'none': only privacy.mode = 'local' or "
                                   "'central' uses it"),
    (["strategy.proximal_mu=0.1"], "strategy.proximal_mu = 0.1 is not allowed with "
                                   "strategy.name = 'fedavg': only strategy.name = 'fedprox'"),
    (["client.momentum=0.9"], "client.momentum = 0.9 is not allowed with client.optimizer = "
                              "'adamw': only client.optimizer = 'sgd' uses it"),
    (["attack.scale_factor=5"], "attack.scale_factor = 5.0 is not allowed with "
                                "attack.name = 'none': only attack.name = 'scaling' uses it"),
    (["tracking.mlflow_uri=sqlite:///x.db"], "tracking.mlflow_uri = 'sqlite:///x.db' is not "
                                             "allowed with tracking.mlflow = False"),
])
def test_a_set_key_that_has_no_effect_is_an_error_naming_it(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(expected)


def test_a_file_key_that_has_no_effect_is_a_one_line_warning(tmp_path):
    """simulations/mlp_digits.toml once said local_epochs = 1 while the default local_steps = 8
    decided: a file's ignored key is reported, even at its default value."""
    file = tmp_path / "c.toml"
    file.write_text("[client]\nlocal_epochs = 1\n[model]\nkind = 'mlp'\n"
                    "[data]\ndataset = 'digits'\n")
    with pytest.warns(ConfigWarning) as caught:
        load_config(file)
    assert [str(w.message) for w in caught] == [
        "client.local_epochs = 1 has no effect with client.local_steps = 8: only "
        "client.local_steps = 0 uses it"]
    file.write_text("[client]\nlocal_epochs = 2\nlocal_steps = 0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(file).client.local_epochs == 2


def test_a_resolved_config_lists_every_key_without_warnings(tmp_path):
    """A run's config.toml (and a copy of it as a new config file) names every key: only keys
    away from their defaults could be reported, and a valid run has none."""
    file = tmp_path / "config.toml"
    file.write_text(to_toml(load_config(None, ["model.kind=mlp", "data.dataset=digits"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_config(file).model.kind == "mlp"
        assert load_config(file, resolved=True).model.kind == "mlp"


def test_every_shipped_config_and_sweep_has_no_key_without_effect():
    from fedtune.studies.sweep import load_sweep

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for path in sorted((REPO / "simulations").glob("*.toml")):
            if "[sweep" in path.read_text():
                load_sweep(path)
            else:
                load_config(path)


def test_keys_without_effect_follow_the_tables():
    """The rule comes from the tables' owners: every key an entry owns is reported when another
    entry is chosen and it is set, and only then."""
    from fedtune.tables.model_kinds import MODEL_KINDS

    config = load_config(None, ["model.kind=mlp", "data.dataset=digits"])
    for name in MODEL_KINDS["hf"].keys:
        assert not keys_without_effect(config)
        assert [n.key for n in keys_without_effect(config, [f"model.{name}"])] == [
            f"model.{name}"]


@pytest.mark.parametrize("device, ok", [("cuda:1", True), ("cuda:0", True), ("cpu", True),
                                        ("auto", True), ("cuda", True), ("gpu", False),
                                        ("cuda:x", False), ("cuda:", False), ("cuda:-1", False)])
def test_client_device_takes_a_gpu_index(device, ok):
    overrides = [f"client.device={device}", "engine.backend=inprocess"]
    if ok:
        assert load_config(None, overrides).client.device == device
    else:
        with pytest.raises(ConfigError, match=f"client.device = '{device}' is not allowed: "
                                              "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            load_config(None, overrides)


def test_a_gpu_index_that_is_not_visible_is_refused_where_the_client_runs():
    import torch

    from fedtune.task import resolve_device

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=f"client.device = 'cuda:{visible}' is not allowed "
                                          "here: "):
        resolve_device(f"cuda:{visible}")
    if visible:
        assert resolve_device(f"cuda:{visible - 1}") == torch.device(f"cuda:{visible - 1}")
    else:
        assert resolve_device("auto") == torch.device("cpu")
