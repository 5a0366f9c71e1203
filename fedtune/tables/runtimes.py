"""Every runtime that drives the same ServerApp and ClientApp, one entry each (``engine.backend``).

An entry names its launcher, a function ``(config, reporter, stop) -> RunDirectory`` that
starts the clients, runs ``fedtune.server.app.run_federated`` on a Flower ``Grid`` and stops
everything again; declares the ``[engine]`` keys it owns; and says what it can promise:
whether checkpoints can hold the clients' ``Context.state`` (its Grid is a
``fedtune.server.grid.SimulatedGrid``) and whether the same config gives the same metrics.
Adding a runtime: write its launcher and Grid (``fedtune/engine/<runtime>.py``) and add one
entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.tables import Entry, Key

if TYPE_CHECKING:
    from fedtune.config import Config


@dataclass(frozen=True)
class RuntimeEntry(Entry):
    client_states: bool = True  # checkpoints keep every client's Context.state
    reproducible: bool = True  # the same config gives the same metrics, run after run
    check: Callable[[Config], None] | None = None
    starting: str = "starting the clients"  # what the user is told while it starts


RUNTIMES: dict[str, RuntimeEntry] = {
    "ray": RuntimeEntry(
        "fedtune's engine: persistent Ray actors serve many virtual clients each",
        keys={
            "num_actors": Key(0, "client actors; 0 = as many as the cluster's CPUs/GPUs allow",
                              ge=0),
            "client_timeout_s": Key(600.0, "a client not done after this long is stopped and "
                                           "reported timeout", gt=0),
            "ray_address": Key("", "address of a running Ray cluster to join ('' = start one "
                                   "here)"),
        },
        implementation="fedtune.engine.ray_engine:run_ray_engine",
        starting="starting Ray and its workers (each loads the data and the model)"),
    "flower": RuntimeEntry(
        "Flower's own Ray simulation (the runtime of `flwr run`)",
        implementation="fedtune.engine.flower_sim:run_flower", client_states=False,
        starting="starting Flower's simulation runtime (Ray, one SuperNode per client)"),
    "inprocess": RuntimeEntry(
        "every client in this process, one after another (no Ray; for debugging)",
        implementation="fedtune.engine.inprocess:run_inprocess",
        starting="building the global model"),
}


def check_runtime(config: Config) -> None:
    entry = RUNTIMES[config.engine.backend]
    if entry.check is not None:
        entry.check(config)
