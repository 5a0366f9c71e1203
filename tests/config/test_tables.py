"""The extension tables: the config is derived from them, and every entry's implementation loads."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

from fedtune.config import SECTIONS, ConfigError, describe, load_config
from fedtune.server.grid import SimulatedGrid
from fedtune.tables import Entry, Key, owners_of, section_class, used_with
from fedtune.tables.datasets import DATASETS
from fedtune.tables.model_kinds import MODEL_KINDS
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import STRATEGIES
from tests.conftest import REPO

TABLES = {"model": ("kind", MODEL_KINDS), "strategy": ("name", STRATEGIES),
          "privacy": ("mode", PRIVACY_MODES), "engine": ("backend", RUNTIMES)}


@pytest.mark.parametrize("section", sorted(TABLES))
def test_each_derived_section_offers_the_tables_names_and_owns_their_keys(section):
    chooser, table = TABLES[section]
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert fields[chooser].metadata["key"].choices == tuple(table)
    for name, entry in table.items():
        for key in entry.keys:
            assert name in owners_of(fields[key]), f"{section}.{key}"


def test_a_key_shared_by_entries_names_every_owner_in_its_help():
    help_of = {key: text for key, _, text in describe()}
    for section, (_, table) in TABLES.items():
        owned: dict[str, list[str]] = {}
        for name, entry in table.items():
            for key in entry.keys:
                owned.setdefault(key, []).append(name)
        for key, owners in owned.items():
            assert help_of[f"{section}.{key}"].endswith(f"({', '.join(owners)})"), key
    assert "(" not in help_of["strategy.fraction_train"]  # common keys name no owner


def test_section_class_merges_shared_keys_and_refuses_conflicting_ones():
    lr = Key(1.0, "a rate", gt=0)
    table = {"a": Entry("a", keys={"lr": lr, "depth": Key(2, "depth", ge=1)}),
             "b": Entry("b", keys={"lr": lr})}
    cls = section_class("Example", "an example", {"name": Key("a", "which")}, table, "name")
    assert [f.name for f in dataclasses.fields(cls)] == ["name", "lr", "depth"]
    assert owners_of(dataclasses.fields(cls)[1]) == ("a", "b")
    depth = used_with(dataclasses.fields(cls)[2])
    assert (depth.chooser, depth.uses("a"), depth.uses("b")) == ("name", True, False)
    assert used_with(dataclasses.fields(cls)[0]) is None  # the chooser always counts
    assert cls().depth == 2
    clash = {"a": Entry("a", keys={"lr": lr}), "b": Entry("b", keys={"lr": Key(2.0, "x")})}
    with pytest.raises(ValueError, match="lr: b declares it differently from a"):
        section_class("Clash", "", {}, clash, "name")
    with pytest.raises(ValueError, match="name is common and owned by a"):
        section_class("Clash", "", {"name": Key("a", "")}, {"a": Entry("a", keys={"name": lr})},
                      "name")


def _required(name: str) -> list[str]:
    """The config values strategy ``name`` needs (its entry's ``requires``), as overrides."""
    return [f"{key}={value}" for key, value in STRATEGIES[name].requires.items()]


def test_every_strategy_entry_names_a_strategy_class_and_its_client_side():
    from flwr.serverapp.strategy import Strategy

    from fedtune.client.algorithms import ClientSide

    for name, entry in STRATEGIES.items():
        assert issubclass(entry.load(), Strategy), name
        if entry.client:
            assert issubclass(entry.load_client(), ClientSide), name
        # every client sampled: enough for any strategy's own check (Bulyan needs 4f + 3)
        arguments = entry.arguments(load_config(None, [
            f"strategy.name={name}", "client.optimizer=sgd", "data.num_clients=8",
            "strategy.fraction_train=1.0", *_required(name)]))
        accepted = inspect.signature(entry.load()).parameters
        assert set(arguments) <= set(accepted), name


def test_every_dataset_model_kind_privacy_mode_and_runtime_implementation_loads():
    from fedtune.privacy.mode import PrivacyMode

    for name, entry in DATASETS.items():  # files: each party loads its own
        assert name == "files" or callable(entry.load()), name

    for entry in MODEL_KINDS.values():
        kind = entry.load()()
        assert all(callable(getattr(kind, method)) for method in
                   ("encode", "spec", "build", "rebuild", "save_files"))
    for entry in PRIVACY_MODES.values():
        assert isinstance(entry.load()(), PrivacyMode)
    for name, entry in RUNTIMES.items():
        launcher = entry.load()
        assert list(inspect.signature(launcher).parameters)[:3] == ["config", "reporter", "stop"]


def test_runtimes_that_promise_client_states_have_a_simulated_grid():
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.engine.ray_grid import RayGrid

    grids = {"inprocess": InProcessGrid, "ray": RayGrid}
    for name, entry in RUNTIMES.items():
        assert entry.client_states == (name in grids)
    assert all(issubclass(grid, SimulatedGrid) for grid in grids.values())


def test_a_key_of_another_runtime_is_refused_and_names_its_owner():
    with pytest.raises(ConfigError, match=r"engine.num_actors = 2 is not allowed with "
                                          r"engine.backend = 'inprocess': must be 0 \(only ray "
                                          r"has it\)"):
        load_config(None, ["engine.backend=inprocess", "engine.num_actors=2"])


def test_typed_section_stubs_are_derived_from_the_tables():
    """`scripts/sync_config_stubs.py` writes fedtune/sections.pyi, the types of the sections
    the tables build (``config.strategy.proximal_mu: float``); the committed file is what it
    writes."""
    out = subprocess.run([sys.executable, "scripts/sync_config_stubs.py", "--check"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_pyproject_flower_config_is_derived_from_the_tables():
    """`scripts/sync_flwr_config.py` writes [tool.flwr.app.config] from the defaults (so from
    the tables); the committed file is what it writes."""
    out = subprocess.run([sys.executable, "scripts/sync_flwr_config.py", "--check"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("mode", sorted(PRIVACY_MODES))
def test_a_privacy_modes_traits_are_what_its_implementation_does(mode):
    """``replaces_strategy``: its implementation's ``strategy`` replaces the configured one;
    ``mechanism``: it plans, noises or clips something (the mode without privacy does not)."""
    from fedtune.privacy.mode import PrivacyMode

    entry = PRIVACY_MODES[mode]
    budget = ["privacy.noise_multiplier=1.0", "privacy.delta=1e-3"] if entry.spends_budget else []
    config = load_config(None, ["data.num_clients=100", f"privacy.mode={mode}", *budget])
    implementation = entry.load()()
    plan = implementation.plan(config)
    assert (implementation.strategy(config, plan, {}) is not None) == entry.replaces_strategy
    overrides = {name for name in vars(type(implementation))
                 if callable(getattr(PrivacyMode, name, None))}
    assert bool(overrides) == entry.mechanism, overrides


def test_the_strategies_central_dp_runs_are_those_with_a_dp_server_optimizer():
    """Central DP accepts exactly the strategies whose entry names a DP server optimizer, and
    each gives DP-FedAvg arguments it takes; or, asynchronous, a DP release (DP-FedBuff), which
    then replaces it."""
    from fedtune.privacy.central_dp import CentralDP
    from fedtune.tables import import_object
    from strategies.dp_fedavg import DPFedAvg

    accepted = inspect.signature(DPFedAvg).parameters
    for name, entry in STRATEGIES.items():
        optimizer = "client.optimizer=sgd" if entry.sgd_only else "client.lr=1e-4"
        overrides = [f"strategy.name={name}", optimizer, "privacy.mode=central",
                     "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
                     "data.num_clients=10", *_required(name)]
        if entry.dp_release:
            config = load_config(None, [*overrides, "privacy.adaptive_clipping=false"])
            mode = CentralDP()
            strategy = mode.strategy(config, mode.plan(config), {})
            assert type(strategy) is import_object(entry.dp_release), name
            continue
        if entry.dp_server_optimizer is None:
            refused = ("(is not allowed with privacy.mode = 'central'|privacy.mode = 'central' "
                       "is not allowed with strategy.name)")  # FedAsync: the mode's reason
            with pytest.raises(ConfigError, match=refused):
                load_config(None, overrides)
            continue
        arguments = entry.dp_server_optimizer(load_config(None, overrides))
        assert set(arguments) <= set(accepted), name
