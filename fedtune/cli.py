"""The ``fedtune`` command: its sub-commands and their arguments (``fedtune.terminal`` draws
what a run shows)."""

from __future__ import annotations

import _thread
import argparse
import ctypes
import json
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedtune import __version__
from fedtune.config import (
    Config,
    ConfigError,
    ConfigWarning,
    annotated_toml,
    check_same_run,
    load_config,
    to_toml,
)
from fedtune.own_process import imports_outside_collection, keep_freed_memory
from fedtune.results.run_dir import check_creatable, is_empty_run_dir, json_safe
from fedtune.results.run_log import capture_run_log, quiet_libraries
from fedtune.results.tracking import check_tracking
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.terminal import (
    JSON,
    NORMAL,
    QUIET,
    RichReporter,
    SweepReporter,
    cell,
    next_lines,
    print_final,
    print_rows,
    times_line,
)


def _run_config(args: argparse.Namespace) -> Config:
    """The config of a new run, or of the run ``--resume`` continues (its own config.toml)."""
    from fedtune.results.run_dir import default_run_path

    if args.resume:
        run_dir = Path(args.resume)
        if args.config or args.output or args.central:
            raise ConfigError("--resume takes the config and directory from RUN_DIR: drop the "
                              "config file, --output and --central (--set run.rounds=N may "
                              "extend it)")
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {args.resume!r} is not allowed: must be a run "
                              "directory (it has no config.toml)")
        config = load_config(run_dir / "config.toml", args.set, resolved=True)
        config.run.dir, config.run.resume = str(run_dir), True
        # a finished run has nothing to continue, but a changed key is still not allowed
        check_same_run(load_config(run_dir / "config.toml", resolved=True), config)
        if not _finished(config):
            from fedtune.results.lock import check_unlocked
            from fedtune.server.resume import check_resumable
            from fedtune.tables.runtimes import check_runtime

            check_unlocked(run_dir)
            check_resumable(config)
            check_runtime(config)  # a runtime may refuse to resume (central keeps no checkpoint)
        check_tracking(config)
        return config
    config = load_config(args.config, [*args.set, *_central_override(args)])
    config.run.dir = str(Path(args.output or config.run.dir or default_run_path(config)))
    _check_new_run_directory(Path(config.run.dir))
    check_tracking(config)
    return config


def _check_new_run_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {str(path)!r} is not allowed: must be a new or empty "
                          "directory, not a file")
    if not is_empty_run_dir(path):
        raise ConfigError(f"--output {str(path)!r} is not allowed: must be a new or empty "
                          "directory")
    check_creatable(path, "--output")


def _finished(config: Config) -> bool:
    """True when the run in ``run.dir`` finished every round ``config`` asks for (or stopped
    for good, as a privacy budget stops it), so a resume has nothing to do."""
    summary = Path(config.run.dir) / "summary.json"
    if not summary.is_file():
        return False
    done = json.loads(summary.read_text(encoding="utf-8"))
    if done.get("status") != "finished":
        return False
    saved = load_config(Path(config.run.dir) / "config.toml", resolved=True)
    return (done.get("rounds_completed", 0) >= config.run.rounds
            or (bool(done.get("stop_reason")) and config.run.rounds <= saved.run.rounds))


def _central_override(args: argparse.Namespace) -> list[str]:
    """``--central``: the centralized reference of the config instead of its federation."""
    return ["engine.backend=central"] if args.central else []


STOP_GRACE_S = 2.0  # how long the first Ctrl-C waits for the run to reach a stop check


class _StopNow(KeyboardInterrupt):
    """The first Ctrl-C's grace ran out: the work under way (a client's training, a noise
    search, loading the data) is abandoned where it is; the last finished round's checkpoint
    is still written (``fedtune.server.resume.Checkpointer.run_aborted``)."""


class _CtrlC:
    """First Ctrl-C: stop at the next wait for a client (a round in progress is abandoned,
    the last finished one checkpointed), or after ``STOP_GRACE_S`` wherever the run is (no
    loop runs on); second: abort at once. ``done`` cancels the pending grace."""

    def __init__(self, console: Console, run_dir: Path) -> None:
        self.stop = threading.Event()
        self.console = console
        self.run_dir = run_dir
        self.grace: threading.Timer | None = None
        self.pressed = self.late = False
        signal.signal(signal.SIGINT, self._interrupt)

    def _interrupt(self, signum: int, frame: Any) -> None:
        if self.late:  # the grace ran out (``_expire``)
            self.late = False
            if self.stop.is_set():  # else the run heeded the stop meanwhile: let it finish
                raise _StopNow
            return
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        self.stop.set()
        if _has_rounds(self.run_dir):
            self.console.print("[bold yellow]stopping[/]: writing a checkpoint of the last "
                               "finished round (Ctrl-C again aborts without it)")
        else:
            self.console.print("[bold yellow]stopping[/]: no round has finished yet, so there "
                               "will be nothing to resume (Ctrl-C again aborts at once)")
        self.grace = threading.Timer(STOP_GRACE_S, self._expire)
        self.grace.daemon = True
        self.grace.start()

    def _expire(self) -> None:
        """The run has not heeded the stop (``fedtune.server.loop.run_rounds`` clears it when
        it does): interrupt the main thread, where the handler raises ``_StopNow``."""
        if self.stop.is_set():
            self.late = True
            _thread.interrupt_main(signal.SIGINT)

    def done(self) -> None:
        if self.grace is not None:
            self.grace.cancel()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _has_rounds(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished round (a metrics.csv row)."""
    metrics = run_dir / "metrics.csv"
    return metrics.is_file() and len(metrics.read_text(encoding="utf-8").splitlines()) > 1


def _interrupted(run_dir: Path) -> str:
    """What a second Ctrl-C (an abort) leaves behind."""
    if _has_rounds(run_dir):
        return (f"[bold yellow]interrupted[/]: the finished rounds are in {run_dir} "
                "(metrics.csv, clients.csv)")
    return ("[bold yellow]interrupted[/] before any round finished: nothing to keep "
            + (f"(what the libraries said is in {run_dir / 'log.txt'})"
               if (run_dir / "log.txt").is_file() else ""))


def _mode(args: argparse.Namespace) -> str:
    return JSON if args.json else QUIET if args.quiet else NORMAL


def _describe_run(config: Config) -> str:
    """One line naming what a run is: data, clients, model, strategy, privacy, runtime."""
    d, m = config.data, config.model
    split = d.partitioner + (f" α={d.alpha:g}" if d.partitioner == "dirichlet" else "")
    model = f"{m.kind}/{m.transfer}"
    private = PRIVACY_MODES[config.privacy.mode].mechanism
    privacy = f", {config.privacy.mode} DP" if private else ""
    if private and config.privacy.insecure_reproducible_noise:
        privacy += " (NOT PRIVATE: noise seeded from run.seed)"
    return (f"{config.run.name}: {d.dataset}, {d.num_clients} clients ({split}), {model}, "
            f"{config.strategy.name}{privacy}, {config.run.rounds} rounds, engine "
            f"{config.engine.backend}")


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = _run_config(args)  # every config error is reported here, before heavy imports
    mode = _mode(args)
    if args.dry_run:
        return dry_run(config, console)
    run_dir = Path(config.run.dir)
    if config.run.resume and _finished(config):
        console.print(f"{run_dir} already finished {config.run.rounds} rounds: nothing to do "
                      "(--set run.rounds=N continues it)", highlight=False)
        return 0
    started = time.perf_counter()
    if mode == NORMAL:
        console.print(f"fedtune {__version__} · {_describe_run(config)}", highlight=False)
        console.print(f"run directory: {run_dir}", highlight=False)
    reporter = RichReporter(console, mode)
    ctrl_c = _CtrlC(console, run_dir)
    reporter.stage("loading torch, transformers and Flower")
    try:
        with capture_run_log(run_dir, echo=args.verbose) as run_log:
            stopped = _launch(config, reporter, ctrl_c.stop, args.verbose, args.owns_process)
    except KeyboardInterrupt:
        reporter.close()
        console.print(_interrupted(run_dir), highlight=False)
        return 130
    except _RunFailed as failure:
        reporter.close()
        print(f"fedtune: run failed: {failure} (traceback in {run_dir / 'log.txt'})",
              file=sys.stderr)
        _print_stopped(console, run_dir, mode)
        return 1
    finally:
        ctrl_c.done()
        reporter.close()
    if stopped:
        _print_stopped(console, run_dir, mode)
        return 130
    if mode == JSON:
        return 0
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    print_final(console, run_dir, summary, _centralized_line(summary))
    if mode == NORMAL:
        if run_log.warnings:
            console.print(f"library warnings: {run_log.warnings}, in {run_log.path}",
                          highlight=False)
        console.print(times_line(time.perf_counter() - started, summary), highlight=False)
        for line in next_lines(run_dir, summary):
            console.print(line, highlight=False)
    console.print(f"run directory: {run_dir}", highlight=False)
    return 0


def _print_stopped(console: Console, run_dir: Path, mode: str) -> None:
    """Where the checkpoint is, if the run got far enough to write one (stderr under --json:
    stdout carries JSON only)."""
    from fedtune.server.checkpoint import checkpoint_round

    written = checkpoint_round(run_dir) if run_dir.is_dir() else None
    text = (f"stopped: checkpoint of round {written} in {run_dir}/checkpoint; continue with: "
            f"fedtune run --resume {run_dir}" if written else
            "stopped before round 1 finished: no checkpoint was written, there is nothing to "
            "resume")
    print(text, file=sys.stderr if mode == JSON else console.file)


class _RunFailed(Exception):
    """A run raised: its message goes to the terminal, its traceback to log.txt."""


def _launch(config: Config, reporter: Any, stop: threading.Event, verbose: bool,
            owns_process: bool) -> bool:
    """Run ``config`` (inside its log capture); True when Ctrl-C stopped it. ``owns_process``:
    this process runs this command alone (``fedtune.own_process``)."""
    quiet_libraries()
    with imports_outside_collection(owns_process):
        from fedtune.engine.launch import launch
        from fedtune.server.exchange import RunStopped
        from fedtune.server.loop import RunFailed

    try:
        launch(config, reporter, stop)
    except (RunStopped, _StopNow):
        return True
    except (ConfigError, KeyboardInterrupt):
        raise
    except RunFailed as failure:  # a stated reason (rounds without an update): no type name
        traceback.print_exc()  # into log.txt
        raise _RunFailed(str(failure)) from failure
    except Exception as error:
        if verbose:
            raise
        traceback.print_exc()  # into log.txt
        raise _RunFailed(f"{type(error).__name__}: {error}") from error
    return False


def _print_summary(console: Console, run_dir: Path) -> None:
    """A finished run's rounds (one line each, as the run printed them) and its result."""
    from fedtune.results.run_dir import RunDirectory

    directory = RunDirectory(run_dir)
    summary = directory.read_json("summary.json")
    runtime = RUNTIMES.get(summary.get("runtime", {}).get("backend", ""))
    setup = (f"centralized on the pooled data of {summary['dataset']['num_clients']} clients"
             if runtime is not None and not runtime.federated
             else f"{summary['dataset']['num_clients']} clients")
    console.print(f"{summary['dataset']['name']}: {setup}, {summary['rounds_completed']} "
                  "rounds", highlight=False)
    mode = PRIVACY_MODES.get((summary.get("privacy") or {}).get("mode", ""))
    privacy = mode is not None and mode.mechanism
    print_rows(console, directory.metrics(), privacy)
    print_final(console, run_dir, summary, _centralized_line(summary))


def dry_run(config: Config, console: Console) -> int:
    """``fedtune run --dry-run``: the resolved config and the partitions, without training."""
    import numpy as np

    from fedtune.data.federation import build_federation
    from fedtune.tables.strategies import clients_per_round

    console.print(to_toml(config), highlight=False, markup=False)
    federation = build_federation(config.data, config.run.seed)
    histogram = federation.label_histogram()
    if not len(histogram):
        console.print("partitions: each SuperNode's own file (data.dataset = 'files'); the "
                      f"server holds {len(federation.test_rows)} global test examples")
        return 0
    sizes, test_sizes = federation.train_sizes, federation.test_sizes
    table = Table(title="partitions: examples per client (train + local test)")
    labels = federation.data.label_names
    for column in ("client", "train", "local test", *labels):
        table.add_column(column, justify="right")
    for client, counts in enumerate(histogram[:MAX_DRY_RUN_ROWS]):
        table.add_row(str(client), str(sizes[client]),
                      str(test_sizes[client]),
                      *(str(int(c)) for c in counts))
    console.print(table)
    if len(histogram) > MAX_DRY_RUN_ROWS:
        console.print(f"... {len(histogram) - MAX_DRY_RUN_ROWS} more clients")
    console.print(
        f"{federation.num_clients} clients, {int(sizes.sum())} training examples (per client: "
        f"min {sizes.min()}, median {int(np.sort(sizes)[len(sizes) // 2])}, max {sizes.max()}); "
        f"{len(federation.test_rows)} global test examples; {clients_per_round(config)} "
        f"clients train per round; nothing was trained (drop --dry-run to run it)",
        highlight=False)
    return 0


MAX_DRY_RUN_ROWS = 40


def _centralized_line(summary: dict[str, Any]) -> str:
    """The centralized reference and the gap to it (a federated run with run.reference), or
    what a centralized run trained on."""
    if summary.get("centralized_accuracy") is not None:
        reference = summary["centralized"]
        return (f"centralized reference {summary['centralized_accuracy']:.4f} "
                f"({reference['examples_seen']:,} examples, {reference['epochs']:.1f} epochs "
                f"of the pooled data): gap to centralized "
                f"{summary['gap_to_centralized']:+.4f} (reference run: {reference['run_dir']})")
    central = summary.get("centralized")
    if central is None:
        return ""
    kept = (f"; model of epoch {central['best_epoch']} (lowest validation loss)"
            if central.get("best_epoch") else "")
    return (f"centralized ({central['until']}): {central['examples_seen']:,} examples, "
            f"{central['epochs']:.1f} epochs of {central['pooled_train_examples']:,} pooled "
            f"training examples{kept}")


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.csv").is_file():  # answered before the plotting imports
        raise ConfigError(f"{args.run_dir!r} is not a run directory: it has no metrics.csv")
    from fedtune.results.report import redraw

    for path in redraw(run_dir):
        console.print(f"wrote {path}")
    if (run_dir / "summary.json").is_file():
        _print_summary(console, run_dir)
    return 0


def launch_point(config: Config) -> None:
    """One sweep point with its log.txt and no terminal output; module-level so that
    ``--parallel``'s child processes can import it."""
    with capture_run_log(Path(config.run.dir), echo=False):
        quiet_libraries()
        from fedtune.engine.launch import launch

        launch(config, SweepReporter(Console(file=sys.stderr), QUIET))


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from fedtune.studies.sweep import load_sweep, run_sweep
    from fedtune.studies.tables import write_outputs

    mode = _mode(args)
    spec = load_sweep(args.config, args.set, args.grid)
    if args.output:
        spec.output_dir, spec.name = str(Path(args.output).parent), Path(args.output).name
    if mode == NORMAL:
        console.print(f"fedtune {__version__} · sweep {spec.name}: {spec.directory}",
                      highlight=False)
    reporter = SweepReporter(console, mode)
    started = {"at": time.perf_counter(), "sweep": time.perf_counter()}

    def run_one(config: Config) -> None:
        with capture_run_log(Path(config.run.dir), echo=args.verbose):
            quiet_libraries()
            from fedtune.engine.launch import launch

            launch(config, reporter)

    def before_run(index: int, total: int, run: Any) -> None:
        started["at"] = time.perf_counter()
        values = " ".join(f"{k}={v}" for k, v in run.values.items())
        reporter.begin(f"[{index}/{total}] {values}")

    def on_run(index: int, total: int, run: Any, status: str) -> None:
        reporter.close()
        summary = json.loads((Path(run.config.run.dir) / "summary.json").read_text())
        if mode == JSON:
            from fedtune.studies.sweep import result_row

            print(json.dumps(json_safe(result_row(run))), file=console.file, flush=True)
            return
        if mode != NORMAL:
            return
        seconds = time.perf_counter() - started["at"]
        values = " ".join(f"{k}={v}" for k, v in run.values.items())
        took = f", {seconds:.1f}s" if status == "done" and args.parallel == 1 else ""
        console.print(f"[{index}/{total}] {values}: {spec.metric} "
                      f"{cell(summary['final'].get(spec.metric), spec.metric, '.4f')} "
                      f"({status}{took})", highlight=False)

    try:
        rows = run_sweep(spec, run_one if args.parallel == 1 else launch_point, on_run,
                         before_run, args.parallel, args.other_code)
    finally:
        reporter.close()
    written = write_outputs(spec, rows)
    if mode == JSON:
        return 0
    for path in written:
        if path.suffix == ".md":
            console.print(path.read_text(), highlight=False)
        elif mode == NORMAL:
            console.print(f"wrote {path}", highlight=False)
    console.print(f"{len(rows)} runs in {time.perf_counter() - started['sweep']:.0f}s "
                  f"({args.parallel} at a time)", highlight=False)
    console.print(f"sweep directory: {spec.directory}", highlight=False)
    return 0


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from fedtune.deploy.certs import write_credentials

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{args.output!r} is not allowed: must be a new or empty directory "
                          "(existing keys are never overwritten)")
    for host in args.host or []:
        if not host.strip() or any(c.isspace() or c in "/,*" for c in host):
            raise ConfigError(f"--host {host!r} is not allowed: must be a host name or an IP "
                              "address")
    if args.supernodes < 1:
        raise ConfigError(f"--supernodes {args.supernodes} is not allowed: must be >= 1 (one "
                          "key pair per SuperNode)")
    made = write_credentials(out, args.host or ["localhost", "127.0.0.1"], args.supernodes)
    console.print(f"CA certificate      {made.ca_cert}   (give to every SuperNode and flwr CLI)")
    console.print(f"SuperLink cert/key  {made.server_cert}  {made.server_key}")
    for private, public in made.supernode_keys:
        console.print(f"SuperNode key pair  {private}  {public}   (register the .pub)")
    console.print(f"publisher key       {made.publisher_key}  {made.publisher_pub}   (signs "
                  "the app: fedtune publish)")
    console.print(f"trusted entities    {made.trusted_entities}   (give to every SuperNode)")
    console.print(f"SuperExec secret    {made.superexec_secret}   (SuperLink and fedtune "
                  "superexec only)")
    return 0


def cmd_publish(args: argparse.Namespace, console: Console) -> int:
    from fedtune.deploy.signing import publish

    published = publish(Path(args.app), Path(args.registry), Path(args.key))
    console.print(f"published {published.spec} (FAB sha256 {published.fab_hash[:16]}...) in "
                  f"{args.registry}; run it with: flwr run {published.spec} <connection>")
    return 0


def cmd_registry(args: argparse.Namespace, console: Console) -> int:
    from fedtune.deploy.registry import RegistryServer

    if not Path(args.registry).is_dir():
        raise ConfigError(f"{args.registry!r} is not allowed: must be the registry folder "
                          "`fedtune publish` writes")
    server = RegistryServer(Path(args.registry), args.host, args.port,
                            log=lambda line: console.print(line, highlight=False))
    console.print(f"serving {args.registry}; start the SuperLink with "
                  f"FLWR_SUPERGRID_API_URL={server.url}", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
    return 0


def cmd_superexec(args: argparse.Namespace, console: Console) -> int:
    from fedtune.deploy.superexec import run_signed_superexec

    run_signed_superexec(args.runtime_api_address, args.root_certificates,
                         Path(args.registry), Path(args.trusted_entities),
                         args.superexec_auth_secret_file, args.accept,
                         Path(args.allow_list) if args.allow_list else None)
    return 0


def cmd_flwr_setup(args: argparse.Namespace, console: Console) -> int:
    """Set ``flwr run .`` up: the local simulation's connection, its SuperLink running."""
    from fedtune.deploy.local_simulation import CONNECTION, set_up_local_simulation

    if args.supernodes < 1:
        raise ConfigError(f"--supernodes {args.supernodes} is not allowed: must be >= 1 (one "
                          "SuperNode per client: data.num_clients)")
    done = set_up_local_simulation(args.supernodes, args.default)
    console.print(f"wrote [superlink.{CONNECTION}] ({done.supernodes} SuperNodes, one CPU each) "
                  f"into {done.config_file}" + (", as the default connection" if done.default
                                                else ""), highlight=False, markup=False)
    console.print("started the local SuperLink without runtime dependency installation"
                  if done.started else
                  "a local SuperLink was running already: if it was started by a plain `flwr "
                  "run`, it installs the app's dependencies (torch) for every run; stop it and "
                  "run this again", highlight=False)
    target = "" if done.default else f" {CONNECTION}"
    console.print(f"now: flwr run .{target} --stream   (flwr run .{target} --run-config "
                  "\"run.rounds=2\" --stream; data.num_clients must be "
                  f"{done.supernodes})", highlight=False, markup=False)
    return 0


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    """Every key as valid TOML, grouped by section: its meaning, allowed values and default."""
    print(annotated_toml(), end="", file=console.file)
    return 0


# --- fedtune audit RUN_DIR: the empirical privacy audit of a finished run ----------------------

def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    """Recompute a run's audit (it must have run with privacy.audit = true); exit code 1
    when the audit's lower bound on ε exceeds the accountant's (an estimate above it is
    reported, not failed)."""
    from fedtune.audit import audit_line, audited_config

    audited_config(args.run_dir)  # a directory that cannot be audited is told before torch
    quiet_libraries()
    from fedtune.audit.report import audit_run_dir, write_audit

    run_dir, audit = audit_run_dir(args.run_dir)
    plot = write_audit(run_dir, audit)
    console.print(f"{audit['kind']}\n{audit_line(audit)}; accountant epsilon "
                  f"{audit['accountant_epsilon']:.4g} at delta {audit['delta']:g}",
                  highlight=False)
    console.print(f"wrote {run_dir.path / 'audit.json'} and {plot}")
    if audit["violation"]:
        console.print("[bold red]VIOLATION[/]: the lower bound on epsilon (95 % confidence) "
                      "is above the accountant's: the mechanism or its accounting is wrong")
        return 1
    return 0


DESCRIPTION = """\
Federated fine-tuning simulations on Flower: clients train a shared model on data that never
leaves them, the server aggregates, and every run leaves a directory of results, a saved model
and plots.

  fedtune run                                   the quickstart: MiniLM, 8 clients, 3 rounds
  fedtune run simulations/mlp_digits.toml       a config file (fedtune config lists every key)
  fedtune run --set data.alpha=0.1 --dry-run    override a key; show the config and partitions
  fedtune sweep simulations/non_iid.toml        a grid of runs, tabulated and plotted
  fedtune report runs/<run>                     a finished run's rounds, result and plots
"""
EPILOG = "Documentation: docs/ (mkdocs serve), or README.md. fedtune COMMAND -h: its options."


def build_parser() -> argparse.ArgumentParser:
    """Sub-commands in the order a user meets them: run, sweep, report, audit, config,
    flwr-setup, then the deployment's (certs, publish, registry, superexec)."""
    parser = argparse.ArgumentParser(prog="fedtune", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run one federated experiment (default: the quickstart)")
    run.add_argument("config", nargs="?", help="TOML config (default: built-in quickstart)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key (repeatable)")
    run.add_argument("--output", help="run directory to create (default: runs/<name>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its checkpoint")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config and the partitions; train nothing")
    run.add_argument("--central", action="store_true",
                     help="train the centralized reference instead (engine.backend=central: "
                          "the pooled client data, as many examples as the federated run)")
    _output_options(run)
    sweep = sub.add_parser("sweep", help="run a grid of experiments, skip finished ones, "
                                         "tabulate and plot")
    sweep.add_argument("config", help="TOML config with a [sweep.grid] table")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one key of the base config (repeatable)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[VALUES]",
                       help="run only these values of one grid key, e.g. run.seed=[0] or "
                            "strategy.name=['fedavg','scaffold'] (repeatable; finished runs "
                            "still fill the tables)")
    sweep.add_argument("--output", help="sweep directory (default: <sweep.output_dir>/<name>)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="run N points at a time, each in its own process (runtimes "
                            "inprocess and central)")
    sweep.add_argument("--other-code", choices=("refuse", "rerun", "reuse"), default="refuse",
                       help="a finished point made by other code (fedtune's source or a "
                            "package version differs): refuse (default: stop and say which), "
                            "rerun it, or reuse it as it is (results.csv records each row's "
                            "code)")
    _output_options(sweep)
    report = sub.add_parser("report", help="print a finished run's rounds and result; redraw "
                                           "its plots")
    report.add_argument("run_dir")
    audit = sub.add_parser("audit", help="empirical privacy audit of a run made with "
                                         "privacy.audit = true (audit.json, plots/audit.png)")
    audit.add_argument("run_dir")
    sub.add_parser("config", help="every config key as TOML: meaning, allowed values, default")
    flwr_setup = sub.add_parser("flwr-setup", help="set `flwr run .` up: a local simulation "
                                                   "connection in ~/.flwr/config.toml and its "
                                                   "SuperLink, without dependency installation")
    flwr_setup.add_argument("--supernodes", type=int, default=Config().data.num_clients,
                            help="SuperNodes to simulate, one per client (default: "
                                 "%(default)s, the default data.num_clients)")
    flwr_setup.add_argument("--default", action="store_true",
                            help="make it the default connection, so a plain `flwr run .` "
                                 "uses it")
    _add_deployment_parsers(sub)
    return parser


def _add_deployment_parsers(sub: Any) -> None:
    certs = sub.add_parser("certs", help="deployment: a CA, the SuperLink's TLS certificate, "
                                         "SuperNode and publisher keys")
    certs.add_argument("output", help="new directory for the files")
    certs.add_argument("--host", action="append", metavar="NAME_OR_IP",
                       help="SuperLink host name or IP the certificate is valid for "
                            "(repeatable; default: localhost and 127.0.0.1)")
    certs.add_argument("--supernodes", type=int, default=3, help="key pairs to create")
    publish = sub.add_parser("publish", help="deployment: build an app's FAB, sign it and add "
                                             "it to the federation's registry")
    publish.add_argument("app", help="the app folder (its pyproject.toml names it)")
    publish.add_argument("--registry", required=True, help="the registry folder")
    publish.add_argument("--key", required=True, help="the publisher's private key")
    registry = sub.add_parser("registry", help="deployment: serve the registry to the "
                                               "SuperLink (its FLWR_SUPERGRID_API_URL)")
    registry.add_argument("registry", help="the registry folder")
    registry.add_argument("--host", default="127.0.0.1")
    registry.add_argument("--port", type=int, default=9095)
    superexec = sub.add_parser("superexec", help="deployment: a SuperExec that starts only "
                                                 "ServerApps the publisher signed")
    superexec.add_argument("--runtime-api-address", required=True)
    superexec.add_argument("--root-certificates", help="the CA certificate (ca.crt)")
    superexec.add_argument("--registry", required=True, help="the registry folder")
    superexec.add_argument("--trusted-entities", required=True)
    superexec.add_argument("--superexec-auth-secret-file")
    superexec.add_argument("--accept", choices=("newest", "signed"), default="newest",
                           help="which signed versions start: each app's newest (default; "
                                "publishing a version retires the older ones) or every one")
    superexec.add_argument("--allow-list", metavar="FILE",
                           help="YAML '@publisher/app==version': expiry date or null; only "
                                "the listed versions start, until they expire (read for every "
                                "run; overrides --accept)")


def _output_options(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true",
                       help="no progress and no per-round (sweep: per-run) lines; only the result")
    shown.add_argument("--json", action="store_true",
                       help="JSON lines on stdout, nothing else: one per round (sweep: per run)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library warnings and worker logs (always in <run dir>/log.txt)")


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "certs": cmd_certs,
            "publish": cmd_publish, "registry": cmd_registry, "superexec": cmd_superexec,
            "config": cmd_config, "audit": cmd_audit, "flwr-setup": cmd_flwr_setup}


@contextmanager
def _config_warnings_as_lines() -> Iterator[None]:
    """A ``ConfigWarning`` prints as one ``fedtune: warning: ...`` line on stderr."""
    shown = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if issubclass(category, ConfigWarning):
            print(f"fedtune: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", ConfigWarning)
            yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    """The command line; ``argv`` None: ``sys.argv``, in a process that runs this command alone
    (the ``fedtune`` script, ``python -m fedtune``)."""
    args = build_parser().parse_args(argv)
    args.owns_process = argv is None
    if args.owns_process:
        keep_freed_memory()
    # bound to this stdout, so that a run's log capture (which takes sys.stdout) leaves it be;
    # long paths stay on one line, also in logs
    console = Console(file=sys.stdout, soft_wrap=True)
    try:
        with _config_warnings_as_lines():
            return COMMANDS[args.command](args, console)
    except ConfigError as error:
        print(f"fedtune: error: {error}", file=sys.stderr)  # one line, never wrapped
        return 2
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/]")
        return 130
    finally:
        _forget_interrupts_seen_by_libraries()


def _forget_interrupts_seen_by_libraries() -> None:
    """Let the exit code be the one ``main`` returns after a Ctrl-C it handled.

    CPython remembers a KeyboardInterrupt that escaped code run through ``PyRun_String``
    (Ray's Cython module runs code that way while it loads) even when a caller caught it, and
    at exit kills its own process with SIGINT: the terminal sees return code -2 instead of
    130, after fedtune printed what it left behind. Running empty code the same way resets
    that flag (CPython's ``run_eval_code_obj``); there is no Python-level call for it.
    """
    ctypes.pythonapi.PyRun_SimpleString(b"")


if __name__ == "__main__":
    sys.exit(main())
