"""``fedtune flwr-setup``: what ``flwr run .`` needs before it runs this app on Flower's local
simulation, in one command.

Flower's CLI runs an app on a SuperLink connection of ``$FLWR_HOME/config.toml`` (default
``~/.flwr``); the local simulation's connection (address ``:local:``) names how many
SuperNodes to start, and the first ``flwr run`` on it starts a detached local SuperLink. That
SuperLink installs each app's dependencies into a fresh environment with ``uv sync`` unless it
was started with ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` - for this app, a second
torch. So this module writes the connection with Flower's own config writer (one SuperNode per
client, a CPU each) and starts the local SuperLink itself, through Flower's own launcher, with
installation off; later ``flwr run . fedtune-sim`` calls find it running.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CONNECTION = "fedtune-sim"
NO_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


@dataclass(frozen=True)
class SetupResult:
    """What ``set_up_local_simulation`` did."""

    config_file: str  # the Flower config it wrote the connection into
    supernodes: int
    default: bool  # the connection is now the default one (plain ``flwr run .``)
    started: bool  # it started the local SuperLink (False: one was running already)


def set_up_local_simulation(supernodes: int, make_default: bool) -> SetupResult:
    """Write ``[superlink.fedtune-sim]`` (``make_default``: and make it the default) and start
    the local SuperLink without runtime dependency installation, unless one is running."""
    from flwr.cli import local_superlink
    from flwr.cli.constant import LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE
    from flwr.cli.flower_config import (
        init_flwr_config,
        read_flower_config,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import (
        SimulationBackendConfig,
        SimulationClientResources,
        SuperLinkConnection,
        SuperLinkSimulationOptions,
    )

    init_flwr_config()
    connection = SuperLinkConnection(
        name=CONNECTION, address=LOCAL_SUPERLINK_ADDRESS_MAGIC_VALUE,
        options=SuperLinkSimulationOptions(
            num_supernodes=supernodes,
            backend=SimulationBackendConfig(
                client_resources=SimulationClientResources(num_cpus=1))))
    write_superlink_connection(connection)
    if make_default:
        set_default_superlink_connection(CONNECTION)
    _, path = read_flower_config()
    running = local_superlink._is_local_superlink_started()  # Flower's own health probe
    if not running:
        os.environ[NO_INSTALL] = "1"  # the SuperLink Flower starts inherits this environment
        local_superlink.ensure_local_superlink(connection)
    return SetupResult(str(path), supernodes, make_default, not running)
