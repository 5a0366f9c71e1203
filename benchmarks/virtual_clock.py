"""What the virtual clock costs the engine, and FedBuff's throughput against synchronous rounds.

Issue 28 asks that device profiles do not slow the engine - a 1,000-client synchronous round
with profiles within 1.1x of one without - and that FedBuff with 1,000 clients in flight
processes at least as many client updates per second as a synchronous 1,000-client round.
The workload is the engine benchmark's (``benchmarks/engine_benchmarks.py``: MLP 1024->64->2
on hashed Rotten Tomatoes, IID, one local step of batch 8, AdamW), in fedtune's own engine:

- ``sync``: every client every round, no devices;
- ``sync+devices``: the same with ``devices.profile = lognormal`` (always available, so the
  same clients train; the clock times, orders and records them);
- ``fedbuff K=n/10``: ``strategy.name = fedbuff``, ``concurrency`` = the clients, a buffer of a
  tenth of them (ten server updates, each followed by the server's evaluation of the global
  model - the default ``strategy.eval_every = 1`` - per n client updates);
- ``fedbuff K=n/10 eval_every=10``: the same evaluating the global model after every tenth
  server update: one evaluation per n client updates, the synchronous round's cadence;
- ``fedbuff K=n``: the same with a buffer of all of them (one server update and one evaluation
  per n client updates, as a synchronous round has: the event loop's own cost).

Every side is a ``fedtune run`` child process, run at two lengths: ``--rounds`` R and
``--long`` (default 2R) synchronous rounds, FedBuff making the same numbers of client updates
(R x n and 2R x n: K = n/10 makes 10 server updates per round). Sides and lengths alternate in
one process tree (A B C D E at R, then at 2R; the next repeat 2R first). Per run the script
reads metrics.csv's ``clients_ok`` (the client updates the server heard: checked against R x n)
and ``bytes_up`` (every trained client's upload, counted when it trains - so FedBuff's clients
trained but never heard show as trained clients per update above 1).

Two measures per side:

- **whole run** (as before): the whole child process tree's CPU-seconds per client update
  (children's ``getrusage``, and for processes the kernel reaps unseen - Ray's workers, as
  the raylet ignores SIGCHLD - their last reading, polled every 0.2 s: without it the Ray
  sides counted the driver only, 11.3 of a 4-round 1,000-client run's ~29 CPU-s) of the R-round run - start-up
  included, and for FedBuff the clients still in flight when the run stops (trained for
  updates the server never hears). Both are fixed costs per run, not throughput;
- **marginal** (steady state): (CPU(2R) - CPU(R)) / (updates(2R) - updates(R)), and wall the
  same way (the child's wall from start to exit): a run's fixed costs - start-up, the first
  round's warm-up and the end-of-run clients in flight - cancel for every side alike, leaving
  what one more client update costs a long run.

The table gives each side's evaluation cadence (global evaluations per n client updates),
medians (min-max) over repeats (marginals pair a repeat's two lengths) and, as before, wall
seconds per round and client updates per wall second of metrics.csv's rows after the first, with
the load average at the start and the end (the machine is shared), the commit and the command.

    python benchmarks/virtual_clock.py                       # 1,000 clients, in process
    python benchmarks/virtual_clock.py --clients 50 --rounds 2 --repeats 1   # a quick check
    python benchmarks/virtual_clock.py --sides "fedbuff K=n" --tree /work/main --tree .  # A/B

With ``--tree`` (repeatable) every side runs once per tree (its ``PYTHONPATH``), the trees
alternating within each side, and each tree's sides are read against its own sync.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

WORKLOAD = [
    "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=1024",
    "model.hidden_sizes=[64]", "model.dropout=0", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.optimizer=adamw", "client.lr=0.1", "strategy.fraction_evaluate=0",
    "strategy.fraction_train=1.0", "run.checkpoint_every=0",
]


def sides(clients: int) -> dict[str, tuple[list[str], int, int]]:
    """Each side's overrides, its server updates per synchronous round and the global
    evaluations it makes per ``clients`` client updates (the evaluation cadence)."""
    tenth = max(1, clients // 10)
    fedbuff = ["strategy.name=fedbuff", "devices.profile=lognormal",
               f"strategy.concurrency={clients}"]
    return {
        "sync": ([], 1, 1),
        "sync+devices": (["devices.profile=lognormal"], 1, 1),
        # an evaluation after every server update (the default): ten per n client updates
        "fedbuff K=n/10": ([*fedbuff, f"strategy.fedbuff_buffer_size={tenth}"], 10, 10),
        # an evaluation every tenth server update: one per n client updates, as the round
        "fedbuff K=n/10 eval_every=10": ([*fedbuff, f"strategy.fedbuff_buffer_size={tenth}",
                                          "strategy.eval_every=10"], 10, 1),
        # one server update (and one evaluation) per n client updates, as a synchronous
        # round has: what the loop itself costs
        "fedbuff K=n": ([*fedbuff, f"strategy.fedbuff_buffer_size={clients}"], 1, 1),
    }


def _auto_reaped(pid: int) -> bool:
    """Whether ``pid``'s children are reaped by the kernel (it ignores SIGCHLD, as Ray's raylet
    does): their CPU then never reaches anyone's ``RUSAGE_CHILDREN``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored.split()[1], 16) & (1 << (signal.SIGCHLD - 1)))


def _lost_cpu_s(root: psutil.Process, seen: dict[int, float], parents: dict[int, bool]) -> None:
    """Record in ``seen`` the CPU-seconds so far of every descendant of ``root`` whose parent
    ignores SIGCHLD (Ray's workers, the raylet's children), with what it reaped itself."""
    for process in root.children(recursive=True):
        try:
            parent = process.ppid()
            if parents.setdefault(parent, _auto_reaped(parent)):
                times = process.cpu_times()
                seen[process.pid] = (times.user + times.system + times.children_user
                                     + times.children_system)
        except psutil.Error:
            continue


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Run:
    """One ``fedtune run``: metrics.csv's rows after the first, its process tree's CPU-seconds,
    its wall seconds from start to exit, the client updates the server heard (``clients_ok``)
    and the bytes its trained clients uploaded (``bytes_up``), over every row."""

    rows: list[dict[str, str]]
    cpu_s: float
    wall_s: float
    updates: int
    bytes_up: int


def run_side(overrides: list[str], out: Path) -> Run:
    """Run ``fedtune run`` with ``overrides`` into ``out``; what it cost and made."""
    fedtune = Path(sys.executable).with_name("fedtune")
    command = [str(fedtune), "run", "--output", str(out)]
    for override in overrides:
        command += ["--set", override]
    before, started = _children_cpu_s(), time.perf_counter()
    lost: dict[int, float] = {}
    parents: dict[int, bool] = {}
    with tempfile.TemporaryFile("w+") as log, subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, text=True) as child:
        root = psutil.Process(child.pid)
        while child.poll() is None:
            _lost_cpu_s(root, lost, parents)
            time.sleep(0.2)
        wall = time.perf_counter() - started
        if child.returncode:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)}\nexited with {child.returncode}:\n"
                             f"{log.read()[-5000:]}")
    # the tree's CPU: what was reaped into this process's RUSAGE_CHILDREN, and the last reading
    # of each process the kernel reaped unseen (up to 0.2 s of its end uncounted)
    cpu = _children_cpu_s() - before + sum(lost.values())
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return Run(rows[1:], cpu, wall, sum(int(r["clients_ok"]) for r in rows),
               sum(int(r["bytes_up"]) for r in rows))


def _spread(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-"
            f"{max(values):.{digits}f})")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4,
                        help="synchronous rounds of the short run (the whole-run figure); "
                             "FedBuff makes as many client updates")
    parser.add_argument("--long", type=int, default=0,
                        help="synchronous rounds of the long run (default 2x --rounds)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="inprocess", choices=("inprocess", "ray"))
    parser.add_argument("--sides", default="",
                        help="comma-separated sides to run beside sync (default: all): "
                             + ", ".join(sides(1000)))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="an override for every side (repeatable), e.g. engine.num_actors=1")
    parser.add_argument("--tree", action="append", default=[],
                        help="a source tree whose fedtune every side runs (PYTHONPATH), "
                             "repeatable: the trees alternate within each side; each tree's "
                             "sides are read against its own sync (default: the current "
                             "PYTHONPATH)")
    args = parser.parse_args()
    lengths = (args.rounds, args.long or 2 * args.rounds)
    if not 0 < lengths[0] < lengths[1]:
        raise SystemExit(f"need 0 < --rounds < --long, got {lengths[0]} and {lengths[1]}")
    base = [*WORKLOAD, f"data.num_clients={args.clients}", f"engine.backend={args.backend}",
            *args.overrides]
    table = sides(args.clients)
    if args.sides:
        wanted = args.sides.split(",")
        unknown = [name for name in wanted if name not in table]
        if unknown:
            raise SystemExit(f"--sides {','.join(unknown)} is not a side: must be among "
                             f"{', '.join(table)}")
        table = {name: table[name] for name in dict.fromkeys(["sync", *wanted])}  # the ratios' base
    trees = {tree: str(Path(tree).resolve()) for tree in args.tree}
    # per tree, each side under a name saying the tree, the tree's sync first (its ratios' base)
    named = {f"{name} @ {tree}" if trees else name: (tree, *side)
             for tree in trees or [""] for name, side in table.items()}
    runs: dict[tuple[str, int], list[Run]] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for length in lengths if repeat % 2 == 0 else lengths[::-1]:
                for side in table:
                    for name, (tree, extra, per_round, _) in named.items():
                        if name.split(" @ ")[0] != side:
                            continue
                        if tree:
                            os.environ["PYTHONPATH"] = trees[tree]
                        run = run_side([*base, *extra, f"run.rounds={length * per_round}"],
                                       Path(tempfile.mkdtemp(dir=folder)))
                        if run.updates != length * args.clients:
                            print(f"note: {name}, {length} rounds: {run.updates} client "
                                  f"updates, not {length * args.clients}", file=sys.stderr)
                        runs.setdefault((name, length), []).append(run)
    load_end = os.getloadavg()
    table = {name: side[1:] for name, side in named.items()}
    short, long = lengths
    # a synchronous round's clients all train and are all heard: its bytes per client update
    # are one trained client's upload
    per_client = statistics.median(r.bytes_up / r.updates for r in runs[(next(iter(table)), short)])
    whole = {name: [1000 * r.cpu_s / r.updates for r in runs[(name, short)]] for name in table}
    whole_long = {name: [1000 * r.cpu_s / r.updates for r in runs[(name, long)]]
                  for name in table}
    pairs = {name: list(zip(runs[(name, short)], runs[(name, long)])) for name in table}
    marginal = {name: [1000 * (b.cpu_s - a.cpu_s) / (b.updates - a.updates) for a, b in pair]
                for name, pair in pairs.items()}
    marginal_rate = {name: [(b.updates - a.updates) / (b.wall_s - a.wall_s) for a, b in pair]
                     for name, pair in pairs.items()}
    trained = {name: [r.bytes_up / per_client / r.updates for r in runs[(name, short)]]
               for name in table}
    marginal_trained = {
        name: [(b.bytes_up - a.bytes_up) / per_client / (b.updates - a.updates)
               for a, b in pair] for name, pair in pairs.items()}
    wall = {name: [float(row["wall_s"]) for length in lengths for r in runs[(name, length)]
                   for row in r.rows] for name in table}
    rate = {name: [sum(int(row["clients_ok"]) for row in r.rows)
                   / sum(float(row["wall_s"]) for row in r.rows)
                   for length in lengths for r in runs[(name, length)]] for name in table}
    updates = {name: (sorted({r.updates for r in runs[(name, short)]}),
                      sorted({r.updates for r in runs[(name, long)]})) for name in table}

    def versus(values: dict[str, list[float]], name: str) -> str:
        tree = name.partition(" @ ")[2]
        sync = values[f"sync @ {tree}" if tree else "sync"]
        return f"{statistics.median(values[name]) / statistics.median(sync):.2f}x"

    print(f"commit {_commit()}: {' '.join(shlex.quote(a) for a in ['python', *sys.argv])}")
    print(f"{args.clients:,} clients, {args.backend}, runs of {short} and {long} rounds, "
          f"{args.repeats} alternated repeats; load average {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end")
    print()
    print(f"| side | evaluations per {args.clients:,} updates | client updates ({short} / "
          f"{long} rounds) | clients trained per update ({short} rounds; marginal) | "
          f"whole-run CPU-ms per update ({short} rounds) | vs sync | whole-run CPU-ms per "
          f"update ({long} rounds) | **marginal CPU-ms per update** | vs sync | marginal "
          "updates per wall s | vs sync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, _, evaluations) in table.items():
        counts = " / ".join(",".join(f"{u:,}" for u in values) for values in updates[name])
        print(f"| {name} | {evaluations} | {counts} | {_spread(trained[name], 3)}; "
              f"{_spread(marginal_trained[name], 3)} | {_spread(whole[name], 2)} | "
              f"{versus(whole, name)} | {_spread(whole_long[name], 2)} | "
              f"{_spread(marginal[name], 2)} | {versus(marginal, name)} | "
              f"{_spread(marginal_rate[name], 0)} | {versus(marginal_rate, name)} |")
    print()
    print("metrics.csv's rows after the first, both lengths (FedBuff K=n/10: per server update):")
    print()
    print("| side | wall s per round, median (min-max) | client updates per wall s, median "
          "(min-max) | vs sync |")
    print("|---|---|---|---|")
    for name in table:
        print(f"| {name} | {_spread(wall[name], 3)} | {_spread(rate[name], 0)} | "
              f"{versus(rate, name)} |")


if __name__ == "__main__":
    main()
