"""What the server carries from one round to the next (and what a checkpoint restores)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord


@dataclass
class RoundState:
    """The global model and the round loop's counters."""

    arrays: ArrayRecord
    server_round: int = 0  # the last completed round
    rounds_without_update: int = 0
    elapsed_s: float = 0.0  # time spent in earlier sessions of a resumed run
    node_to_client: dict[int, int] = field(default_factory=dict)
    stop_reason: str = ""  # why the run ended before run.rounds (privacy budget)
    run_key: str = ""  # names the run on a deployment's SuperNodes (fedtune.server.node_state)
    virtual_time_s: float = 0.0  # the virtual clock (fedtune.devices.clock) after the round
