"""Every runtime that drives the same ServerApp and ClientApp, one entry each (``engine.backend``).

An entry names its launcher, a function ``(config, reporter, stop) -> RunDirectory`` that
starts the clients, runs ``fedtune.server.app.run_federated`` on a Flower ``Grid`` and stops
everything again; declares the ``[engine]`` keys it owns; and says what it can promise:
whether checkpoints can hold the clients' ``Context.state`` (its Grid is a
``fedtune.server.grid.SimulatedGrid``) and whether the same config gives the same metrics.
Adding a runtime: write its launcher and Grid (``fedtune/engine/<runtime>.py``) and add one
entry here. ``central`` is the one runtime without a federation: its launcher trains the
centralized reference (``fedtune.centralized``) and writes the same run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key
from fedtune.tables.datasets import DATASETS
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.strategies import STRATEGIES

if TYPE_CHECKING:
    from fedtune.config import Config


@dataclass(frozen=True)
class RuntimeEntry(Entry):
    client_states: bool = True  # checkpoints keep every client's Context.state
    reproducible: bool = True  # the same config gives the same metrics, run after run
    # it computes in the calling process (no Ray: a GPU needs no engine.client_gpus, and a
    # sweep may run its points in parallel processes)
    in_process: bool = False
    federated: bool = True  # it runs a federation (False: the centralized reference)
    check: Callable[[Config], None] | None = None
    starting: str = "starting the clients"  # what the user is told while it starts
    asynchronous_refused: str = ""  # why it cannot run an asynchronous strategy ("" = it can)


def _check_central(config: Config) -> None:
    """A centralized run trains the pooled data without any federated mechanism."""
    if PRIVACY_MODES[config.privacy.mode].mechanism:
        plain = [name for name, entry in PRIVACY_MODES.items() if not entry.mechanism]
        raise ConfigError(f"privacy.mode = {config.privacy.mode!r} is not allowed with "
                          "engine.backend = 'central': must be "
                          + " or ".join(repr(name) for name in plain)
                          + " (the centralized reference pools the data without privacy)")
    faulty = [name for name, value in vars(config.faults).items()
              if name.endswith(("_fraction", "_probability")) and value]
    if faulty:
        raise ConfigError(f"faults.{faulty[0]} = {getattr(config.faults, faulty[0])!r} is not "
                          "allowed with engine.backend = 'central': must be 0 (there are no "
                          "clients to misbehave)")
    if DATASETS[config.data.dataset].party_files:
        raise ConfigError(f"data.dataset = {config.data.dataset!r} is not allowed with "
                          "engine.backend = 'central': must be a benchmark dataset (the "
                          "parties' files are never pooled)")
    if config.engine.central_until == "converged" and config.data.local_test_fraction == 0:
        raise ConfigError("data.local_test_fraction = 0 is not allowed with "
                          "engine.central_until = 'converged': must be > 0 (the clients' "
                          "pooled local test splits decide when training has converged)")
    if config.run.resume:
        raise ConfigError("run.resume = true is not allowed with engine.backend = 'central': "
                          "must be false (a centralized run keeps no checkpoint; start it "
                          "again)")


def _check_ray(config: Config) -> None:
    """A GPU memory cap needs a GPU share to cap."""
    e = config.engine
    if e.client_gpu_memory_mb and not e.client_gpus:
        raise ConfigError(f"engine.client_gpu_memory_mb = {e.client_gpu_memory_mb} is not "
                          "allowed with engine.client_gpus = 0: must be 0 (clients without a "
                          "GPU share have no GPU memory to cap); set engine.client_gpus > 0")


# fedtune's own runtimes run cohorts of clients, so they can train clients together
VECTORISE_CLIENTS = Key(
    True, "train eligible clients together, a chunk at a time, with torch.func.vmap (plain "
          "FedAvg-family, FedProx, FedNova, SCAFFOLD and FedDyn clients, clipped or under "
          "local DP-SGD with secret draws, no faults, fp32 on CPU, the MLP or a head on pooled "
          "features; under an attack the "
          "update attackers train with them, a data attacker alone; any other run "
          "trains one client at a time, and the run's log says which and why): faster, and "
          "agrees with one client at a time to float rounding, not bit for bit; false = always "
          "one at a time")

# fedtune's own runtimes keep their clients' state (fedtune.state.store)
CLIENT_STATE_MEMORY_MB = Key(
    1024, "memory for the clients' state (SCAFFOLD's variates, a local DP accountant, a "
          "personal model), in MiB; beyond it the least recently used states wait on disk in "
          "<run dir>/client_states/ (0 = every state on disk)", ge=0)

RUNTIMES: dict[str, RuntimeEntry] = {
    "ray": RuntimeEntry(
        "fedtune's engine: persistent Ray actors serve many virtual clients each",
        keys={
            "num_actors": Key(0, "client actors; 0 = as many as the cluster's CPUs/GPUs allow, "
                                 "less one CPU that a local run leaves its driver, and none "
                                 "where that is one local actor: the clients run in this "
                                 "process (fedtune/engine/shape.py: the rules and why)", ge=0),
            "client_timeout_s": Key(600.0, "a client not done after this long is stopped and "
                                           "reported timeout", gt=0),
            "ray_address": Key("", "address of a running Ray cluster to join ('' = start one "
                                   "here)"),
            "actor_min_cohort": Key(8, "start Ray actors only when a round's train or evaluate "
                                       "phase holds at least this many clients; a smaller "
                                       "run's clients run in this process, with the same "
                                       "results (fedtune/engine/shape.py: the rule and why). "
                                       "engine.num_actors, ray_address or client_gpus set: "
                                       "always actors; 0 = actors whatever the cohort, unless "
                                       "the default pool is one local actor", ge=0),
            "vectorise_clients": VECTORISE_CLIENTS,
            "client_state_memory_mb": CLIENT_STATE_MEMORY_MB,
            "client_gpu_memory_mb": Key(0, "GPU memory cap per actor in MiB, enforced (a "
                                           "client that passes it fails with one line, the "
                                           "round goes on; fedtune/engine/gpu_memory.py); 0 = "
                                           "the engine.client_gpus share of the GPU", ge=0),
        },
        implementation="fedtune.engine.ray_engine:run_ray_engine", check=_check_ray,
        starting="starting the clients (Ray's workers each load the data and the model; a "
                 "cohort under engine.actor_min_cohort, or a default pool of one local actor, "
                 "runs here instead)"),
    "flower": RuntimeEntry(
        "Flower's own Ray simulation (the runtime of `flwr run`)",
        implementation="fedtune.engine.flower_sim:run_flower", client_states=False,
        asynchronous_refused="must be 'ray' or 'inprocess' (Flower's simulation runs a "
                             "ServerApp's rounds; fedtune's asynchronous event loop starts "
                             "clients on a virtual clock through fedtune's own engines)",
        starting="starting Flower's simulation runtime (Ray, one SuperNode per client)"),
    "inprocess": RuntimeEntry(
        "every client in this process, one after another (no Ray; for debugging)",
        keys={"vectorise_clients": VECTORISE_CLIENTS,
              "client_state_memory_mb": CLIENT_STATE_MEMORY_MB},
        implementation="fedtune.engine.inprocess:run_inprocess", in_process=True,
        starting="building the global model"),
    "central": RuntimeEntry(
        "no federation: the centralized reference, the same model, data pipeline, optimizer "
        "and global test set trained on the union of the clients' training splits",
        keys={
            "central_until": Key("examples", "examples = as many training examples as the "
                                             "federated run (run.rounds rows); converged = "
                                             "epochs until the loss on the clients' pooled "
                                             "local test splits stops improving",
                                 choices=("examples", "converged")),
        },
        implementation="fedtune.engine.centralized:run_central", client_states=False,
        check=_check_central, in_process=True, federated=False,
        starting="loading the pooled training data"),
}


def check_runtime(config: Config) -> None:
    entry = RUNTIMES[config.engine.backend]
    if entry.check is not None:
        entry.check(config)
    strategy = STRATEGIES[config.strategy.name]
    if strategy.personal_part and not entry.federated:
        keeps = ", ".join(repr(name) for name, e in RUNTIMES.items() if e.federated)
        raise ConfigError(
            f"engine.backend = {config.engine.backend!r} is not allowed with strategy.name = "
            f"{config.strategy.name!r}: its clients keep a personal part across rounds; must "
            f"be one of {keeps}")
