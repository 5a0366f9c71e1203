"""What one client's state costs in the client state store (``fedtune.state.store``), and a
scale check of the store as the driver uses it.

Costs, per client (tracemalloc over many clients, so Python's object overheads are in):

- registered, without state: what a runtime's driver holds for a client that has none yet
  (an ``InProcessGrid`` of 100,000 clients against one of 1,000);
- hot: bytes in memory while its state is within ``engine.client_state_memory_mb``;
- spilled: the bookkeeping left in memory once its state waits on disk;
- on disk: the state file's size and the blocks the file system gives it.

for two states: SCAFFOLD's control variate on ``simulations/mlp_digits.toml``'s MLP (taken
from a real one-round in-process run) and a 770-float personal head (a linear head on
MiniLM's 384 frozen features, 2 classes: a stand-in of that size for the personalisation
algorithms still to come).

Scale check, in a fresh process (that imports the store and the checkpoint writer only): ``--clients`` clients with states of the SCAFFOLD state's
size (random bytes, so nothing is deduplicated) under ``--budget-mb``; each of ``--rounds``
rounds reads and changes a cohort of ``--cohort`` clients' states (``get_bytes`` and
``put_bytes``, as the engines do) and writes a checkpoint as the server does (``snapshot``,
``write_checkpoint``, ``checkpointed``). It prints each checkpoint's time and what it wrote,
and the process's RSS after its imports and at its peak; the first checkpoint writes every
state, the later ones only the cohort's. Times need a quiet machine.

    python benchmarks/client_state_costs.py --clients 10000 --cohort 1000 --rounds 5 \\
        --budget-mb 64
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedtune.server.checkpoint import Checkpoint, write_checkpoint
from fedtune.state.blobs import STATE_DIR
from fedtune.state.codec import state_to_bytes
from fedtune.state.store import MB, ClientStateStore

REPO = Path(__file__).resolve().parents[1]
MLP_DIGITS = REPO / "simulations" / "mlp_digits.toml"
SCAFFOLD = ["strategy.name=scaffold", "client.optimizer=sgd", "run.rounds=1",
            "strategy.fraction_train=1.0", "strategy.fraction_evaluate=0.0",
            "engine.backend=inprocess", "data.num_clients=4"]
HEAD_FEATURES, HEAD_CLASSES = 384, 2  # MiniLM's pooled features, a binary task: 770 floats


def scaffold_state(folder: Path) -> bytes:
    """A client's SCAFFOLD state after one real round of mlp_digits.toml, as bytes."""
    from fedtune.client.app import app as client_app
    from fedtune.config import load_config, to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.protocol import SCAFFOLD_STATE
    from fedtune.server.app import run_federated

    config = load_config(MLP_DIGITS, [*SCAFFOLD, f"run.dir={folder / 'run'}"])
    grid = InProcessGrid(client_app, to_run_config(config), config.data.num_clients)
    run_federated(grid, config)
    data = grid.client_states.get_bytes(0)
    assert data is not None and SCAFFOLD_STATE in grid.client_states.get(0)
    return data


def head_state() -> bytes:
    """A 770-float personal head as a client's state."""
    rng = np.random.default_rng(0)
    head = ArrayRecord({
        "weight": Array(rng.normal(size=(HEAD_CLASSES, HEAD_FEATURES)).astype(np.float32)),
        "bias": Array(np.zeros(HEAD_CLASSES, np.float32))})
    return state_to_bytes(RecordDict({"personal-head": head}))


def traced(build: Callable[[], object]) -> tuple[int, object]:
    """Bytes still allocated after ``build()`` (what it keeps), and what it built."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, built


def variants(data: bytes, count: int) -> list[bytes]:
    """``count`` distinct states of ``data``'s size (the same bytes with a counter at the
    end would share nothing either, but would not be decodable; the store never decodes)."""
    return [data[:-8] + i.to_bytes(8, "little") for i in range(count)]


def per_client(name: str, data: bytes, clients: int, folder: Path) -> None:
    states = variants(data, clients)

    def fill(budget: int, directory: Path | None) -> ClientStateStore:
        store = ClientStateStore(budget)
        if directory is not None:
            store.open(directory)
        for client, state in enumerate(states):
            store.put_bytes(client, state)
        return store

    # the states' bytes objects exist before the store: hot costs them, spilled does not
    hot, store = traced(lambda: fill(1 << 40, None))
    hot += sum(len(s) + 33 for s in states)  # a bytes object: 33 bytes + its data
    del store
    directory = folder / name.split()[0]
    spilled, _ = traced(lambda: fill(0, directory))
    files = [path for path in directory.rglob("*") if path.is_file()]
    allocated = sum(path.stat().st_blocks * 512 for path in files)
    print(f"{name}: state {len(data):,} B; hot {hot / clients:,.0f} B/client; spilled "
          f"{spilled / clients:,.0f} B/client in memory; on disk {len(data):,} B file, "
          f"{allocated / len(files):,.0f} B allocated")


def registered(clients: int) -> float:
    """Bytes a driver holds per registered client without state (an InProcessGrid)."""
    from fedtune.client.app import app as client_app
    from fedtune.config import load_config, to_run_config
    from fedtune.engine.inprocess import InProcessGrid

    config = load_config(MLP_DIGITS, ["engine.backend=inprocess"])

    def grid(num: int) -> object:
        config.data.num_clients = num
        return InProcessGrid(client_app, to_run_config(config), num)

    small, _ = traced(lambda: grid(1000))
    large, _ = traced(lambda: grid(clients))
    return (large - small) / (clients - 1000)


def _rss_mb() -> float:
    """The process's peak resident set so far, in MiB (Linux's VmHWM: unlike ru_maxrss, it
    does not start from the parent's peak)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:"))
               .split()[1]) / 1024


def scale_check(size: int, args: argparse.Namespace, folder: Path) -> None:
    print(f"scale: RSS after imports {_rss_mb():,.0f} MiB")
    store = ClientStateStore(int(args.budget_mb * MB))
    store.open(folder / STATE_DIR)
    rng = np.random.default_rng(0)

    def state() -> bytes:
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()

    started = time.perf_counter()
    for client in range(args.clients):
        store.put_bytes(client, state())
    print(f"scale: {args.clients:,} clients x {size:,} B ({args.clients * size / MB:,.0f} MiB "
          f"of state) under a {args.budget_mb:g} MiB budget: filled in "
          f"{time.perf_counter() - started:.1f} s")
    for server_round in range(1, args.rounds + 1):
        if server_round > 1:
            for client in rng.choice(args.clients, args.cohort, replace=False):
                store.get_bytes(int(client))  # the engine ships it to the client ...
                store.put_bytes(int(client), state())  # ... and keeps what comes back
        started = time.perf_counter()
        snapshot = store.snapshot()
        written = len(snapshot.pending) + len(snapshot.unsynced)
        write_checkpoint(folder, Checkpoint(server_round, {"w": np.zeros(1)}, ({}, {}),
                                            ({}, {}), snapshot))
        store.checkpointed(snapshot)
        took = time.perf_counter() - started
        files = [p for p in (folder / STATE_DIR).rglob("*") if p.is_file()]
        print(f"round {server_round}: checkpoint {took:.2f} s, {written:,} state files made "
              f"durable, {len(files):,} on disk "
              f"({sum(p.stat().st_size for p in files) / MB:,.0f} MiB), hot "
              f"{store.hot_bytes / MB:,.0f} MiB; peak RSS {_rss_mb():,.0f} MiB")
    print(f"(a format 2 checkpoint wrote every state each time: "
          f"{args.clients * size / MB:,.0f} MiB per checkpoint)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--cohort", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-mb", type=float, default=64)
    parser.add_argument("--cost-clients", type=int, default=2_000,
                        help="clients the per-client costs are averaged over")
    parser.add_argument("--scale-only", type=int, default=0, metavar="STATE_BYTES",
                        help=argparse.SUPPRESS)  # the scale check's own process
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtune-state-") as temporary:
        folder = Path(temporary)
        if args.scale_only:
            scale_check(args.scale_only, args, folder)
            return
        scaffold = scaffold_state(folder)
        print(f"registered, no state: {registered(100_000):,.0f} B/client")
        per_client("scaffold (mlp_digits.toml)", scaffold, args.cost_clients, folder)
        per_client("personal head (770 floats)", head_state(), args.cost_clients, folder)
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--scale-only",
                    str(len(scaffold))], check=True)


if __name__ == "__main__":
    main()
