"""fedtune's engine against pfl-research, Flower's stock simulation and a tight torch loop.

Every side runs as a child process of this script (one process tree), the sides alternate
(A B C A B C ...), and each reports per round its wall seconds and the CPU seconds of its whole
process tree (driver, Ray's processes and actors, torchrun's workers). The first round of every
run pays for lazy imports and warm-up and is left out; the table shows medians over the other
rounds of all repeats. Sub-benchmarks:

- ``rounds``: the workload of issue 13 - MLP 1024->64->2 on hashed Rotten Tomatoes, IID, batch
  8, one local step of AdamW (fused, lr 0.1), every client every round, the server's evaluation
  on the global test set after every round - on fedtune's Ray engine (its default shape: on 2
  cores, a pool of one actor, so the clients run in process, ``fedtune.engine.shape``), fedtune in one process, pfl 0.6.0 in one process
  and with two workers (torchrun, gloo), and Flower's stock simulation; 100, 1,000 and 10,000 clients. fedtune runs each of its runtimes twice: clients
  one at a time (``engine.vectorise_clients = false``) and trained together (the default,
  ``torch.func.vmap`` over chunks of clients). Ratios are other / fedtune Ray engine.
- ``floor``: the same clients' steps in a tight torch loop (one model, one fused AdamW reset
  per client, batches built beforehand, one thread) plus one server evaluation: what any
  simulator must spend. (fedtune's CPU per round - floor) / clients is its per-client overhead.
  Beside it the batched floor: the same steps as ``torch.func.vmap`` over chunks of 32 stacked
  copies and one fused AdamW over the stack, batches stacked beforehand (what clients trained
  together compute, without any bookkeeping).
- ``central``: federated (Ray engine) against centralized training on the same batches in one
  process with the same model and optimizer, with and without start-up.
- ``startup``: where fedtune's start-up goes (imports, data and features, Ray, actors).
- ``lora``: MiniLM with LoRA adapters (r 8) on Rotten Tomatoes, 32 clients, one local step of
  batch 8, fedtune's Ray engine against pfl in one process and two workers.
- ``frozen``: a linear head on MiniLM's cached pooled features (``model.transfer = frozen``)
  on Rotten Tomatoes, 1,000 clients, one local step of batch 8: fedtune (one client at a time,
  and vectorised) against pfl fed the same features.
- ``rss``: peak resident memory at 100, 1,000 and 10,000 clients, 100 sampled per round.

Run: ``python benchmarks/engine_benchmarks.py rounds floor central startup lora frozen rss``
(needs ``pip install -e '.[bench]'`` for pfl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MLP = [
    "data.dataset=rotten_tomatoes", "model.kind=mlp", "model.num_features=1024",
    "model.hidden_sizes=[64]", "model.dropout=0", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.optimizer=adamw", "client.lr=0.1", "strategy.fraction_evaluate=0",
    "strategy.fraction_train=1.0", "engine.node_wait_s=900", "run.checkpoint_every=0",
]
# From this many clients on each Rotten Tomatoes client holds 0-1 training examples (11,476 in
# all): those rows train on the generated federation (8 synthetic examples a client, 32 dense
# features, so a 32-64-2 MLP), and say so
GENERATED_FROM = 10_000
GENERATED = ["data.dataset=generated", "data.client_examples=8"]


def workload(base: list[str], clients: int) -> tuple[list[str], str]:
    """The overrides of a row of ``clients`` clients, and its label in the table."""
    if base is MLP and clients >= GENERATED_FROM:
        kept = [o for o in base if not o.startswith("data.dataset=")]
        return [*kept, *GENERATED], f"{clients:,} (generated)"
    return base, f"{clients:,}"


LORA = [
    "data.dataset=rotten_tomatoes", "model.kind=hf", "model.transfer=lora", "model.max_length=48",
    "data.partitioner=iid", "data.max_examples=3000", "data.local_test_fraction=0",
    "client.local_steps=1", "client.batch_size=8", "client.optimizer=adamw", "client.lr=1e-3",
    "strategy.fraction_evaluate=0", "strategy.fraction_train=1.0", "engine.node_wait_s=900",
    "run.checkpoint_every=0",
]

FROZEN = [  # the encoder's pooled features are computed once and cached (~/.cache/fedtune)
    "data.dataset=rotten_tomatoes", "model.kind=hf", "model.transfer=frozen",
    "model.max_length=48", "data.partitioner=iid", "data.max_examples=0",
    "data.local_test_fraction=0", "client.local_steps=1", "client.batch_size=8",
    "client.optimizer=adamw", "client.lr=1e-3", "strategy.fraction_evaluate=0",
    "strategy.fraction_train=1.0", "engine.node_wait_s=900", "run.checkpoint_every=0",
]


# --- measuring a process tree -----------------------------------------------------------------

def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, as the benchmarks print them before and after."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    return children


def tree_cpu(root: int) -> dict[int, tuple[float, float]]:
    """pid -> (its own user + system CPU seconds, those of the children it has reaped), for
    ``root`` and every living descendant."""
    children, out, stack = _children(), {}, [root]
    ticks = os.sysconf("SC_CLK_TCK")
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = ((int(fields[11]) + int(fields[12])) / ticks,
                    (int(fields[13]) + int(fields[14])) / ticks)
    return out


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and every living descendant (and the children
    they have reaped)."""
    return sum(own + reaped for own, reaped in tree_cpu(root).values())


def probe_cpu_s() -> float:
    """``tree_cpu_s`` of this process, its own part read from the process clock (nanoseconds)
    instead of /proc's ticks (10 ms: a 1,000-client round's ~0.37 CPU-s read to +-3 %)."""
    me = os.getpid()
    tree = tree_cpu(me)
    _, reaped = tree.pop(me)
    return time.process_time() + reaped + sum(own + gone for own, gone in tree.values())


def tree_rss_kb(root: int) -> int:
    """Summed VmRSS of ``root`` and all its descendants."""
    children, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


# --- the sides, each run in a child process ---------------------------------------------------

class RoundProbe:
    """A fedtune Reporter that prints each round's wall time and the tree's CPU seconds."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.cpu = probe_cpu_s()
        self.first = True

    def start(self, config, run_dir) -> None:
        pass

    def phase(self, server_round, phase, done, total) -> None:
        if self.first:  # the first round starts: everything before is start-up
            self.first = False
            print(json.dumps({"startup_s": time.perf_counter() - self.started}), flush=True)
            self.cpu = probe_cpu_s()

    def round_end(self, row) -> None:
        cpu = probe_cpu_s()
        print(json.dumps({"round": row.round, "wall_s": row.wall_s, "cpu_s": cpu - self.cpu,
                          "accuracy": row.eval_accuracy}), flush=True)
        self.cpu = probe_cpu_s()

    def finish(self, summary, run_dir) -> None:
        pass


def side_fedtune(overrides: list[str], out: str) -> None:
    started = time.perf_counter()
    from fedtune.config import load_config
    from fedtune.engine.launch import launch

    config = load_config(None, overrides)
    config.run.dir = out
    launch(config, RoundProbe(started))


def side_floor(overrides: list[str]) -> None:
    """The clients' steps in a tight loop, and one server evaluation."""
    import numpy as np
    import torch

    from fedtune.config import load_config
    from fedtune.models.build import build_model
    from fedtune.task import task_resources
    from fedtune.train import evaluate, make_optimizer, reset_optimizer

    torch.set_num_threads(1)
    config = load_config(None, overrides)
    resources = task_resources(config)
    model = build_model(resources.spec, config.run.seed)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad],
                               resources.train_settings)
    labels = resources.federation.data.labels
    rng = np.random.default_rng(0)
    batches = []
    for rows in resources.federation.client_train_rows:
        picked = rng.permutation(rows)[:config.client.batch_size]
        batches.append((resources.encoded.pad(picked), torch.from_numpy(labels[picked])))
    loss_fn = torch.nn.CrossEntropyLoss()
    batched = _batched_floor(model, batches, resources.train_settings)
    for repeat in range(3):
        cpu = time.process_time()
        for inputs, target in batches:
            reset_optimizer(optimizer).zero_grad(set_to_none=True)
            loss_fn(model(**inputs), target).backward()
            optimizer.step()
        steps_s = time.process_time() - cpu
        cpu = time.process_time()
        batched()
        batched_s = time.process_time() - cpu
        cpu = time.process_time()
        evaluate(model, resources.global_test_loader(), torch.device("cpu"))
        print(json.dumps({"steps_cpu_s": steps_s, "batched_cpu_s": batched_s,
                          "batched_clients": batched.clients,
                          "eval_cpu_s": time.process_time() - cpu}), flush=True)


FLOOR_CHUNK = 32  # clients a step of the batched floor trains together


def _batched_floor(model, batches, settings):
    """The batched floor: the same clients' steps as ``torch.func.vmap(grad)`` over chunks of
    FLOOR_CHUNK stacked copies of the model and one fused AdamW step over the stack (the
    computation engine.vectorise_clients does, without any of its bookkeeping), batches
    stacked beforehand; a chunk's copies start from the global weights."""
    import torch
    from torch.func import functional_call, grad, vmap

    from fedtune.train import make_optimizer, reset_optimizer

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    chunks = []
    for start in range(0, len(batches) - FLOOR_CHUNK + 1, FLOOR_CHUNK):
        part = batches[start:start + FLOOR_CHUNK]
        if len({len(target) for _, target in part}) == 1:  # equal batches (no padding)
            chunks.append(({key: torch.stack([inputs[key] for inputs, _ in part])
                            for key in part[0][0]}, torch.stack([t for _, t in part])))
    stacked = [p.detach().expand(FLOOR_CHUNK, *p.shape).clone()
               for name, p in model.named_parameters() if name in names]
    optimizer = make_optimizer(stacked, settings)
    start = [p.detach() for name, p in model.named_parameters() if name in names]

    def loss(params, inputs, target):
        out = functional_call(model, dict(zip(names, params, strict=True)), args=(),
                              kwargs=inputs)
        return torch.nn.functional.cross_entropy(out, target)

    step = vmap(grad(loss))

    def run() -> None:
        for inputs, target in chunks:
            with torch.no_grad():
                torch._foreach_copy_(stacked, [p.expand_as(s) for p, s in
                                               zip(start, stacked, strict=True)])
            reset_optimizer(optimizer)
            for param, gradient in zip(stacked, step(tuple(stacked), inputs, target),
                                       strict=True):
                param.grad = gradient
            optimizer.step()
    run.clients = len(chunks) * FLOOR_CHUNK
    return run


def side_central(overrides: list[str], threads: int) -> None:
    """Centralized training over the clients' batches (one step each), in one process."""
    import torch

    from fedtune.config import load_config
    from fedtune.models.build import build_model
    from fedtune.task import task_resources
    from fedtune.train import make_optimizer

    started = time.perf_counter()
    torch.set_num_threads(threads)
    config = load_config(None, overrides)
    resources = task_resources(config)
    model = build_model(resources.spec, config.run.seed)
    optimizer = make_optimizer(list(model.parameters()), resources.train_settings)
    loaders = [resources.client_train_loader(c, c) for c in range(config.data.num_clients)]
    loss_fn = torch.nn.CrossEntropyLoss()
    startup = time.perf_counter() - started
    for repeat in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        for loader in loaders:
            inputs, target = next(iter(loader))
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(**inputs), target).backward()
            optimizer.step()
        print(json.dumps({"wall_s": time.perf_counter() - wall,
                          "cpu_s": time.process_time() - cpu, "startup_s": startup}), flush=True)


def side_startup(overrides: list[str]) -> None:
    """fedtune's start-up, step by step."""
    marks = [("process start", time.perf_counter())]
    import flwr.app  # noqa: F401
    import ray  # noqa: F401
    import torch  # noqa: F401

    marks.append(("imports (torch, flwr, ray)", time.perf_counter()))
    from fedtune.config import load_config
    from fedtune.engine.ray_pool import ActorFactory, ray_session, start_actors
    from fedtune.engine.shape import pool_size
    from fedtune.task import task_resources

    config = load_config(None, overrides)
    task_resources(config)
    marks.append(("data, partition, features (driver)", time.perf_counter()))
    with ray_session(config):
        marks.append(("Ray start", time.perf_counter()))
        from fedtune.client.app import app
        from fedtune.config import to_run_config

        factory = ActorFactory(app, to_run_config(config), 1, 1.0, 0.0)
        start_actors(factory, pool_size(config, ray.cluster_resources()), 900)
        marks.append(("actors loaded (data, model)", time.perf_counter()))
    for (_, before), (name, after) in zip(marks, marks[1:]):
        print(json.dumps({"step": name, "seconds": after - before}), flush=True)


SIDES = {"fedtune": side_fedtune, "floor": side_floor, "central": side_central,
         "startup": side_startup}


# --- running and tabulating -------------------------------------------------------------------

def run_side(command: list[str], cwd: Path | None = None) -> tuple[list[dict], float]:
    """Run one side; its JSON lines and its tree's total CPU seconds (sampled while it ran)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    peak_cpu = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_cpu
        while not stop.is_set():
            peak_cpu = max(peak_cpu, tree_cpu_s(child.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = [json.loads(line) for line in child.stdout if line.startswith("{")]
    code = child.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed with code {code}")
    return lines, peak_cpu


def fedtune_command(overrides: list[str], out: Path) -> list[str]:
    command = [sys.executable, __file__, "_side", "fedtune", str(out)]
    return command + [item for o in overrides for item in ("--set", o)]


def pfl_command(overrides: list[str], rounds: int, workers: int) -> list[str]:
    script = [str(HERE / "pfl_side.py"), "--rounds", str(rounds)]
    script += [item for o in overrides for item in ("--set", o)]
    if workers == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={workers}",
            "--master_port=29533", *script]


def steady(lines: list[dict]) -> list[dict]:
    rounds = [line for line in lines if "round" in line]
    return rounds[1:] or rounds


def bench_rounds(out: Path, sizes: list[int], rounds: int, repeats: int,
                 flower_sizes: list[int], flower_rounds: int, base: list[str],
                 title: str, vectorised: bool = True) -> None:
    print(f"\n## {title}: seconds per round, medians over rounds 2.. of {repeats} alternated "
          "runs")
    print("| clients | runtime | s/round (min-max) | CPU-s/round (min-max) | CPU-ms per "
          "client-round | start-up s | accuracy (last round) | time ratio (runtime / fedtune "
          "ray) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        row_base, label = workload(base, n)
        overrides = [*row_base, f"data.num_clients={n}", f"run.rounds={rounds}"]
        sides = {  # clients one at a time (engine.vectorise_clients = false)
            "fedtune ray (default shape)": lambda i, o=overrides, k=n: fedtune_command(
                [*o, "engine.backend=ray", "engine.vectorise_clients=false"],
                out / f"ray-{k}-{i}"),
            "fedtune in process": lambda i, o=overrides, k=n: fedtune_command(
                [*o, "engine.backend=inprocess", "engine.vectorise_clients=false"],
                out / f"inproc-{k}-{i}"),
        }
        if vectorised:  # clients trained together (torch.func.vmap), engine.vectorise_clients
            sides |= {
                f"{name}, vectorised": lambda i, o=overrides, k=n, b=backend, t=tag:
                fedtune_command([*o, f"engine.backend={b}", "engine.vectorise_clients=true"],
                                out / f"{t}-vec-{k}-{i}")
                for name, backend, tag in (("fedtune ray (default shape)", "ray", "ray"),
                                           ("fedtune in process", "inprocess", "inproc"))}
        sides |= {
            "pfl 1 process": lambda i, o=overrides: pfl_command(o, rounds, 1),
            "pfl 2 workers": lambda i, o=overrides: pfl_command(o, rounds, 2),
        }
        if n in flower_sizes:
            flower = [*row_base, f"data.num_clients={n}", f"run.rounds={flower_rounds}"]
            sides["Flower simulation"] = lambda i, o=flower, k=n: fedtune_command(
                [*o, "engine.backend=flower"], out / f"flower-{k}-{i}")
        results: dict[str, list[dict]] = {name: [] for name in sides}
        startups: dict[str, list[float]] = {name: [] for name in sides}
        for repeat in range(repeats):
            for name, command in sides.items():
                lines, _ = run_side(command(repeat))
                results[name] += steady(lines)
                startups[name] += [line["startup_s"] for line in lines if "startup_s" in line]
        reference = statistics.median(r["wall_s"]
                                      for r in results["fedtune ray (default shape)"])
        for name, rows in results.items():
            wall = statistics.median(r["wall_s"] for r in rows)
            cpu = statistics.median(r["cpu_s"] for r in rows)
            accuracy = rows[-1].get("accuracy")
            shown = "-" if accuracy is None else f"{accuracy:.3f}"
            start = f"{statistics.median(startups[name]):.1f}" if startups[name] else "-"
            print(f"| {label} | {name} | {_spread(rows, 'wall_s')} | {_spread(rows, 'cpu_s')} | "
                  f"{1000 * cpu / n:.2f} | {start} | {shown} | {wall / reference:.2f}x |",
                  flush=True)


def _spread(rows: list[dict], key: str) -> str:
    """The median with the range of every measured round beside it."""
    values = [r[key] for r in rows]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def floor_lines(n: int) -> list[dict]:
    """The floor side's measures for the MLP workload with ``n`` clients (a child process)."""
    row_base, _ = workload(MLP, n)
    lines, _ = run_side([sys.executable, __file__, "_side", "floor", "-",
                         *[x for o in [*row_base, f"data.num_clients={n}"]
                           for x in ("--set", o)]])
    return lines


def batched_floor_ms(lines: list[dict]) -> list[float]:
    """The batched floor's CPU-ms per client-round, one value per measure of ``floor_lines``."""
    return [1000 * line["batched_cpu_s"] / line["batched_clients"] for line in lines]


def bench_floor(sizes: list[int]) -> None:
    print("\n## the floor: the same steps in a tight torch loop (one thread), and one server "
          "evaluation")
    print("| clients | steps CPU-s | per step ms | batched floor: per client-round ms "
          f"(vmap, chunks of {FLOOR_CHUNK}, fused AdamW) | server evaluation CPU-s |")
    print("|---|---|---|---|---|")
    for n in sizes:
        lines = floor_lines(n)
        label = workload(MLP, n)[1]
        steps = statistics.median(line["steps_cpu_s"] for line in lines)
        batched = statistics.median(batched_floor_ms(lines)) / 1000
        evaluation = statistics.median(line["eval_cpu_s"] for line in lines)
        print(f"| {label} | {steps:.3f} | {1000 * steps / n:.3f} | {1000 * batched:.3f} | "
              f"{evaluation:.3f} |", flush=True)


def bench_central(out: Path, n: int, rounds: int, repeats: int) -> None:
    print(f"\n## federated vs centralized: the same {n:,} batches of 8 (one per client), one step "
          "each")
    print("| setting | wall s | CPU-s | start-up s | ratio to centralized (1 thread) |")
    print("|---|---|---|---|---|")
    overrides = [*MLP, f"data.num_clients={n}", f"run.rounds={rounds}", "engine.backend=ray"]
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for repeat in range(repeats):
        for threads in (1, 2):
            lines, _ = run_side([sys.executable, __file__, "_side", "central", str(threads),
                                 *[x for o in overrides for x in ("--set", o)]])
            rows.setdefault(f"centralized, one process, {threads} thread(s)", []).extend(
                (line["wall_s"], line["cpu_s"], line["startup_s"]) for line in lines[1:])
        lines, _ = run_side(fedtune_command(overrides, out / f"central-{repeat}"))
        startup = [line["startup_s"] for line in lines if "startup_s" in line]
        rows.setdefault("federated, fedtune ray (default shape x 1 thread), per round",
                        []).extend(
            (line["wall_s"], line["cpu_s"], startup[0]) for line in steady(lines))
    reference = statistics.median(r[0] for r in rows["centralized, one process, 1 thread(s)"])
    for name, values in rows.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        start = statistics.median(v[2] for v in values)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {start:.1f} | {wall / reference:.2f}x |",
              flush=True)


def bench_startup(n: int) -> None:
    print(f"\n## fedtune start-up, {n:,} clients (features cached on disk after the first run)")
    print("| step | seconds |")
    print("|---|---|")
    overrides = [*MLP, f"data.num_clients={n}", "engine.backend=ray"]
    for repeat in range(2):
        lines, _ = run_side([sys.executable, __file__, "_side", "startup", "-",
                             *[x for o in overrides for x in ("--set", o)]])
        for line in lines:
            print(f"| {line['step']} (run {repeat + 1}) | {line['seconds']:.2f} |", flush=True)


def bench_rss(out: Path, sizes: list[int]) -> None:
    print("\n## peak RSS, driver + Ray processes (same data, 100 clients per round, 2 rounds)")
    print("| total clients | peak RSS MiB | ratio to 100 |")
    print("|---|---|---|")
    base_kb = None
    for n in sizes:
        overrides = [*MLP, f"data.num_clients={n}", "run.rounds=2",
                     f"strategy.fraction_train={100 / n}", "engine.backend=ray"]
        child = subprocess.Popen(fedtune_command(overrides, out / f"rss-{n}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss_kb(child.pid))
            time.sleep(0.25)
        if child.returncode != 0:
            raise RuntimeError(f"the {n}-client run failed ({child.returncode})")
        base_kb = base_kb or peak
        print(f"| {n:,} | {peak / 1024:.0f} | {peak / base_kb:.2f}x |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["_side"]:
        side, argument = sys.argv[2], sys.argv[3]
        parser = argparse.ArgumentParser()
        parser.add_argument("--set", action="append", default=[])
        overrides = parser.parse_args(sys.argv[4:]).set
        if side == "fedtune":
            side_fedtune(overrides, argument)
        elif side == "central":
            side_central(overrides, int(argument))
        else:
            SIDES[side](overrides)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*",
                        default=["rounds", "floor", "central", "startup", "lora", "frozen",
                                 "rss"])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--flower-sizes", default="100,1000")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flower-rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import platform

    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
          f"Python {sys.version.split()[0]}; load average before: {os.getloadavg()[0]:.2f}")
    sizes = [int(n) for n in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        if "rounds" in args.which:
            bench_rounds(out, sizes, args.rounds, args.repeats,
                         [int(n) for n in args.flower_sizes.split(",")], args.flower_rounds,
                         MLP, "MLP 1024-64-2, hashed Rotten Tomatoes, 1 local step")
        if "floor" in args.which:
            bench_floor(sizes)
        if "central" in args.which:
            bench_central(out, 1000, args.rounds, args.repeats)
        if "startup" in args.which:
            bench_startup(1000)
        if "lora" in args.which:  # LoRA clients train one at a time (not vectorisable)
            bench_rounds(out, [32], 3, args.repeats, [], 0, LORA,
                         "MiniLM + LoRA (r 8), Rotten Tomatoes, 1 local step of batch 8",
                         vectorised=False)
        if "frozen" in args.which:
            bench_rounds(out / "frozen", [1000], args.rounds, args.repeats, [], 0, FROZEN,
                         "MiniLM frozen, a head on cached pooled features, Rotten Tomatoes, "
                         "1 local step of batch 8")
        if "rss" in args.which:
            bench_rss(out, [100, 1000, 10000])


if __name__ == "__main__":
    main()
