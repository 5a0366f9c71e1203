"""Input that used to give a traceback, a runaway allocation or a silent surprise: each is now
a one-line error naming the key or file, before any work starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import ConfigError, load_config
from fedtune.deploy import certs
from fedtune.engine.launch import preflight
from fedtune.task import task_resources


def _error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("setting, message", [
    ("client.lr=inf", "client.lr = inf is not allowed: must be a finite number > 0"),
    ("strategy.fedopt_eta=inf", "must be a finite number > 0"),
    ("attack.scale_factor=-inf", "attack.scale_factor = -inf is not allowed: must be a finite "
                                 "number"),
    ("strategy.round_timeout_s=inf", "must be a finite number > 0"),
    ("run.name=../../x", "run.name = '../../x' is not allowed: must be a plain name"),
    ("model.hidden_sizes=[100000, 100000]", "about 10,509,801,000 parameters, must stay below"),
])
def test_bad_values_are_refused_by_name(setting, message):
    base = ["model.kind=mlp"] if "hidden" in setting else []
    if "fedopt" in setting:
        base = ["strategy.name=fedadam"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [*base, setting])


def test_infinity_stays_allowed_where_it_means_something():
    config = load_config(None, ["privacy.mode=local", "privacy.target_epsilon=inf"])
    assert config.privacy.target_epsilon == float("inf")


def test_the_prv_accountant_is_bounded_up_front():
    with pytest.raises(ConfigError, match="privacy.accountant = 'prv' is not allowed for "
                                          "1,000,000,000 rounds"):
        load_config(None, ["privacy.mode=central", "privacy.target_epsilon=1",
                           "privacy.accountant=prv", "run.rounds=1000000000",
                           "data.num_clients=1000"])
    # with local_epochs the steps depend on the data: refused once the sizes are known
    config = load_config(None, [
        "data.dataset=digits", "model.kind=mlp", "data.partitioner=iid", "data.num_clients=2",
        "privacy.mode=local", "privacy.target_epsilon=1", "privacy.delta=1e-4",
        "privacy.accountant=prv", "client.local_steps=0", "client.batch_size=1",
        "run.rounds=100"])
    with pytest.raises(ConfigError, match="DP-SGD steps of the largest client"):
        task_resources(config)


@pytest.mark.parametrize("settings, message", [
    (["data.max_examples=1"], "data.test_fraction = 0.1 of 1 examples (data.max_examples = 1) "
                              "is not allowed: leaves 0 for training and 1"),
    (["data.test_fraction=0.999"], "data.num_clients = 8 is not allowed: must be <= 1 "
                                   "(training examples of digits once data.test_fraction = "
                                   "0.999 is held out)"),
    (["data.test_fraction=0.9999"], "data.test_fraction = 0.9999 of 1797 examples"),
])
def test_splits_without_examples_are_config_errors(settings, message):
    config = load_config(None, ["data.dataset=digits", "model.kind=mlp",
                                "data.partitioner=iid", *settings])
    with pytest.raises(ConfigError) as info:
        task_resources(config)
    assert message in str(info.value)


def test_config_files_that_are_not_toml_text(tmp_path, capsys):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    assert _error(capsys, "run", str(latin)) == (
        f"fedtune: error: config file {str(latin)!r} is not UTF-8 text: byte 0xe9 at offset 17")
    assert _error(capsys, "run", str(tmp_path)) == (
        f"fedtune: error: config file {str(tmp_path)!r} is a directory: must be a TOML file")


def test_output_must_be_a_directory(tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("x")
    assert _error(capsys, "run", "--output", str(file)) == (
        f"fedtune: error: --output {str(file)!r} is not allowed: must be a new or empty "
        "directory, not a file")


def test_certs_refuse_an_empty_host_and_a_negative_count(tmp_path, capsys):
    assert _error(capsys, "certs", str(tmp_path / "a"), "--host", "") == (
        "fedtune: error: --host '' is not allowed: must be a host name or an IP address")
    assert _error(capsys, "certs", str(tmp_path / "b"), "--supernodes", "-3") == (
        "fedtune: error: --supernodes -3 is not allowed: must be >= 1 (one key pair per "
        "SuperNode)")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_private_keys_are_never_readable_by_others(tmp_path, monkeypatch):
    """Created 0600, not chmod'ed after the write: a umask of 0 and no chmod at all still
    give 0600."""
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: pytest.fail("chmod after the write"))
    old = os.umask(0)
    try:
        made = certs.write_credentials(tmp_path / "creds", ["localhost"], 1)
    finally:
        os.umask(old)
    private = [tmp_path / "creds" / "ca.key", made.server_key, made.supernode_keys[0][0]]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(made.ca_cert.stat().st_mode) == 0o644


def test_party_files_need_a_deployment():
    config = load_config(None, ["data.dataset=files", "data.label_names=[\"a\", \"b\"]",
                                "data.test_path=test.csv", "engine.backend=inprocess"])
    with pytest.raises(ConfigError, match="data.dataset = 'files' is not allowed with "
                                          "engine.backend = 'inprocess': each party's file "
                                          "comes from its own SuperNode"):
        preflight(config)


# --- second pass (issue 25, items 8 and 9): bounds and one-line errors -----------------------

@pytest.mark.parametrize("setting, message", [
    ("run.seed=9223372036854775808", "run.seed = 9223372036854775808 is not allowed: must be "
                                     "below 2^63"),
    ("client.eval_batch_size=1e308", "client.eval_batch_size = 1e+308 is not allowed: must be "
                                     "below 2^63"),
    ("data.num_clients=-99999999999999999999", "must be below 2^63"),
    ('run.name="a\\nb"', "run.name = 'a\\nb' is not allowed: must be a plain name"),
    ("run.name='" + "a" * 5000 + "'", "is not allowed: must be a plain name of at most 200 "
                                      "characters"),
    ("strategy.rfa_iterations=100000000", "strategy.rfa_iterations = 100000000 is not "
                                          "allowed: must be an integer >= 0 and <= 1000"),
    ("tracking.mlflow_uri='bogus://x'", "tracking.mlflow_uri = 'bogus://x' is not allowed: "
                                        "must be a path, or a URI of scheme file, http, https"),
])
def test_extreme_values_are_refused_by_name(setting, message):
    base = {"rfa": ["strategy.name=rfa"], "mlflow": ["tracking.mlflow=true"]}
    extra = next((v for k, v in base.items() if k in setting), [])
    with pytest.raises(ConfigError) as info:
        load_config(None, [*extra, setting])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["central", "local"])
@pytest.mark.parametrize("setting, message", [
    ("privacy.noise_multiplier=1e308", "privacy.noise_multiplier = 1e+308 is not allowed: "
                                       "must be a number >= 0 and <= 1000"),
    ("privacy.noise_multiplier=1e-320", "privacy.noise_multiplier = 1e-320 is not allowed: "
                                        "must be 0 (derived from privacy.target_epsilon) or "
                                        ">= 0.01"),
    ("privacy.target_epsilon=1e-6", "privacy.target_epsilon = 1e-06 is not allowed: must be "
                                    "> 0.103"),
])
def test_privacy_values_no_accountant_can_handle_are_refused(mode, setting, message):
    """σ of 1e308 or 1e-320 overflowed the accountants; a target ε below what infinite noise
    certifies sent the noise search on for minutes before a ValueError."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"privacy.mode={mode}", "privacy.delta=1e-5", setting])
    assert message in str(info.value)


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[run]\nrounds = 7\n")
    assert load_config(bom).run.rounds == 7


@pytest.mark.parametrize("where", ["below a file", "in /proc"])
def test_output_that_cannot_be_created_is_one_line(tmp_path, capsys, where):
    file = tmp_path / "taken.txt"
    file.write_text("x")
    output = str(file / "run") if where == "below a file" else "/proc/fedtune-run"
    line = _error(capsys, "run", "--output", output, "--set", "run.rounds=1")
    assert line.startswith(f"fedtune: error: --output {output!r} is not allowed: ")


def test_an_unwritable_mlflow_store_is_refused_before_the_run(tmp_path, capsys):
    file = tmp_path / "taken.txt"
    file.write_text("x")
    line = _error(capsys, "run", "--output", str(tmp_path / "run"), "--set",
                  "tracking.mlflow=true", "--set", f"tracking.mlflow_uri='{file}/mlruns'")
    assert line.startswith("fedtune: error: tracking.mlflow_uri = ")
    assert "is not allowed: " in line and not (tmp_path / "run").exists()


def test_the_api_refuses_odd_overrides_and_a_file_as_output(tmp_path):
    import numpy as np

    from fedtune.api import resolve_config, run

    config = resolve_config(None, {"run.seed": np.int64(3), "client.lr": np.float32(0.5),
                                   "data": {"partitioner": "dirichlet", "alpha": 0.25}})
    assert (config.run.seed, config.client.lr, config.data.alpha) == (3, 0.5, 0.25)
    with pytest.raises(ConfigError, match=r"overrides key 1 is not allowed: must be a text "
                                          r"'section.key'"):
        resolve_config(None, {1: 2})
    with pytest.raises(ConfigError, match="overrides\\['run.name'\\] = None is not allowed"):
        resolve_config(None, {"run.name": None})
    file = tmp_path / "taken.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match=f"output = {str(file)!r} is not allowed: must be a "
                                          "new or empty directory, not a file"):
        run(None, {"run.rounds": 1}, output=file, progress=False)
