"""Command line: ``fedtune run | sweep | report | audit | certs | config``. The only module that knows about terminals."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedtune.config import Config, ConfigError, describe, load_config

# (metrics.csv column, short title, format): one terminal line per round, < 80 characters
METRIC_COLUMNS = (
    ("round", "round", "{:.0f}"),
    ("train_loss", "trainloss", "{:.4f}"),
    ("eval_loss", "testloss", "{:.4f}"),
    ("eval_accuracy", "testacc", "{:.4f}"),
    ("eval_macro_f1", "testF1", "{:.4f}"),
    ("federated_eval_accuracy", "clientacc", "{:.4f}"),
    ("clients_ok", "ok", "{:.0f}"),
    ("clients_failed", "fail", "{:.0f}"),
    ("bytes_up", "MBup", "{:.1f}"),
    ("wall_s", "sec", "{:.1f}"),
)
WIDTHS = (5, 9, 8, 7, 6, 9, 3, 4, 7, 6)


def _fmt(value: Any, pattern: str, key: str) -> str:
    if value in (None, ""):
        return "-"
    number = float(value)
    if key == "bytes_up":
        number /= 1e6
    return pattern.format(number)


class RichReporter:
    """Live progress bar (round, clients done, loss, accuracy, time) and a per-round table."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]round {task.fields[round]}/{task.fields[rounds]}"),
            TextColumn("{task.fields[phase]:>8}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("clients  loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task_id: Any = None
        self.rounds = 0

    def start(self, config: Config, run_dir: Any) -> None:
        self.rounds = config.run.rounds
        self.console.print(f"run directory: {run_dir.path}")
        header = " ".join(f"{title:>{w}}" for (_, title, _), w in zip(METRIC_COLUMNS, WIDTHS))
        self.console.print(header, style="bold")
        self.progress.start()
        self.task_id = self.progress.add_task("fl", total=config.data.num_clients, round=1,
                                              rounds=self.rounds, phase="train", loss="-",
                                              acc="-")

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        self.progress.update(self.task_id, completed=done, total=total, round=server_round,
                             phase=phase)

    def round_end(self, row: Any) -> None:
        values = row.__dict__
        self.console.print(" ".join(f"{_fmt(values.get(key), pattern, key):>{w}}"
                                    for (key, _, pattern), w in zip(METRIC_COLUMNS, WIDTHS)))
        self.progress.update(self.task_id, completed=0,
                             loss=_fmt(row.train_loss, "{:.4f}", ""),
                             acc=_fmt(row.eval_accuracy, "{:.4f}", ""))

    def finish(self, summary: dict[str, Any], run_dir: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flwr.supercore.logger import FLOWER_LOGGER  # importing it resets its level

    FLOWER_LOGGER.setLevel(logging.WARNING)


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
        config = load_config(run_dir / "config.toml", args.set)
        config.run.dir, config.run.resume = str(run_dir), True
        from fedtune.server.resume import check_resumable
        from fedtune.tables.runtimes import check_runtime

        check_resumable(config)
        check_runtime(config)  # a runtime may refuse to resume (central keeps no checkpoint)
        return config
    config = load_config(args.config, [*args.set, *_central_override(args)])
    config.run.dir = str(Path(args.output or config.run.dir or default_run_path(config)))
    if Path(config.run.dir).exists() and any(Path(config.run.dir).iterdir()):
        raise ConfigError(f"--output {config.run.dir!r} is not allowed: must be a new or empty "
                          "directory")
    return config


def _central_override(args: argparse.Namespace) -> list[str]:
    """``--central``: the centralized reference of the config instead of its federation."""
    return ["engine.backend=central"] if args.central else []


def _stop_on_ctrl_c(console: Console) -> threading.Event:
    """First Ctrl-C: finish the client being waited for, checkpoint, stop. Second: abort."""
    stop = threading.Event()

    def on_interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print("[bold yellow]stopping[/]: writing a checkpoint of the last finished "
                      "round (Ctrl-C again aborts without it)")

    signal.signal(signal.SIGINT, on_interrupt)
    return stop


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    config = _run_config(args)  # every config error is reported here, before heavy imports
    _quiet_libraries()
    from fedtune.engine.launch import launch
    from fedtune.server.exchange import RunStopped

    reporter = RichReporter(console)
    started = time.perf_counter()
    stop = _stop_on_ctrl_c(console)
    try:
        launch(config, reporter, stop)
    except RunStopped:
        reporter.close()
        if (Path(config.run.dir) / "checkpoint").is_dir():
            console.print(f"[bold yellow]stopped[/]: checkpoint in {config.run.dir}/checkpoint;"
                          f" continue with: fedtune run --resume {config.run.dir}")
        else:
            console.print(f"[bold yellow]stopped[/]: finished rounds are in {config.run.dir}")
        return 130
    finally:
        reporter.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _print_summary(console, Path(config.run.dir))
    console.print(f"finished in {time.perf_counter() - started:.1f}s")
    console.print(f"run directory: {config.run.dir}")
    return 0


def _print_summary(console: Console, run_dir: Path) -> None:
    from fedtune.results.run_dir import RunDirectory

    directory = RunDirectory(run_dir)
    summary = directory.read_json("summary.json")
    setup = (f"centralized on the pooled data of {summary['dataset']['num_clients']} clients"
             if summary.get("runtime", {}).get("backend") == "central"
             else f"{summary['dataset']['num_clients']} clients")
    table = Table(title=f"{summary['dataset']['name']}: {setup}, {summary['rounds_completed']} "
                        "rounds", padding=(0, 0))
    for _, title, _ in METRIC_COLUMNS:
        table.add_column(title, justify="right")
    for row in directory.metrics():
        table.add_row(*(_fmt(row.get(key), pattern, key) for key, _, pattern in METRIC_COLUMNS))
    console.print(table)
    final = summary["final"]
    console.print(
        f"final global test accuracy {final['eval_accuracy']:.4f}, macro-F1 "
        f"{final['eval_macro_f1']:.4f} (majority class "
        f"{summary['dataset']['majority_class_accuracy']:.4f}); best "
        f"{summary['best']['eval_accuracy']:.4f} at round {summary['best']['round']}"
    )
    line = _centralized_line(summary)
    if line:
        console.print(line, highlight=False)


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
    from fedtune.results.report import redraw

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise ConfigError(f"{args.run_dir!r} is not a run directory: it has no metrics.csv")
    for path in redraw(run_dir):
        console.print(f"wrote {path}")
    if (run_dir / "summary.json").is_file():
        _print_summary(console, run_dir)
    return 0


class QuietReporter:
    """Progress of one run inside a sweep: nothing (the sweep prints a line per run)."""

    def start(self, config: Config, run_dir: Any) -> None:
        pass

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        pass

    def round_end(self, row: Any) -> None:
        pass

    def finish(self, summary: dict[str, Any], run_dir: Any) -> None:
        pass


def launch_point(config: Config) -> None:
    """One sweep point, without terminal output; module-level so that ``--parallel``'s child
    processes can import it."""
    _quiet_libraries()
    from fedtune.engine.launch import launch

    launch(config, QuietReporter())


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from fedtune.results.plots import plot_curves, plot_round_curves, plot_sweep
    from fedtune.studies.sweep import SEED_KEY, load_sweep, run_sweep, table_keys
    from fedtune.studies.tables import round_curves, run_curves, write_pivot, write_table

    spec = load_sweep(args.config, args.set, args.grid)
    if args.output:
        spec.output_dir, spec.name = str(Path(args.output).parent), Path(args.output).name
    _quiet_libraries()
    console.print(f"sweep directory: {spec.directory}")

    def on_run(index: int, total: int, run: Any, status: str) -> None:
        summary = Path(run.config.run.dir) / "summary.json"
        final = json.loads(summary.read_text())["final"]
        values = " ".join(f"{k}={v}" for k, v in run.values.items())
        console.print(f"[{index}/{total}] {values}: {spec.metric} "
                      f"{_fmt(final.get(spec.metric), '{:.4f}', '')} ({status})",
                      highlight=False)

    started = time.perf_counter()
    rows = run_sweep(spec, launch_point, on_run, args.parallel)
    console.print(f"{len(rows)} runs in {time.perf_counter() - started:.0f}s "
                  f"({args.parallel} at a time)", highlight=False)
    table = write_table(spec, rows)
    console.print((spec.directory / "table.md").read_text(), highlight=False)
    x_key, series_key = spec.extra.get("x"), spec.extra.get("series")
    if x_key:
        path = spec.directory / "plot.png"
        keys = [key for key in table_keys(spec) if key != SEED_KEY]
        plot_sweep(table, keys, x_key, series_key, spec.metric, path)
        console.print(f"wrote {path}")
    if spec.extra.get("rows"):
        path = write_pivot(spec, table, spec.extra["rows"])
        console.print(path.read_text(), highlight=False)
    if spec.extra.get("bytes_curves"):
        path = spec.directory / "bytes_curves.png"
        plot_curves(run_curves(spec), path)
        console.print(f"wrote {path}")
    if spec.extra.get("curves"):
        path = spec.directory / "curves.png"
        plot_round_curves(round_curves(spec, rows), spec.extra["curves"], spec.metric, path)
        console.print(f"wrote {path}")
    console.print(f"sweep directory: {spec.directory}")
    return 0


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from fedtune.deploy.certs import write_credentials

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{args.output!r} is not allowed: must be a new or empty directory "
                          "(existing keys are never overwritten)")
    made = write_credentials(out, args.host or ["localhost", "127.0.0.1"], args.supernodes)
    console.print(f"CA certificate      {made.ca_cert}   (give to every SuperNode and flwr CLI)")
    console.print(f"SuperLink cert/key  {made.server_cert}  {made.server_key}")
    for private, public in made.supernode_keys:
        console.print(f"SuperNode key pair  {private}  {public}   (register the .pub)")
    return 0


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    table = Table(title="fedtune config keys")
    for column in ("key", "default", "meaning"):
        table.add_column(column)
    for key, default, help_text in describe():
        table.add_row(key, repr(default), help_text)
    console.print(table)
    return 0


# --- fedtune audit RUN_DIR: the empirical privacy audit of a finished run ----------------------

def cmd_audit(args: argparse.Namespace, console: Console) -> int:
    """Recompute a run's audit (it must have run with privacy.audit = true); exit code 1
    when the empirical ε exceeds the accountant's."""
    _quiet_libraries()
    from fedtune.audit.report import audit_run_dir, write_audit

    run_dir, audit = audit_run_dir(args.run_dir)
    plot = write_audit(run_dir, audit)
    low, high = audit["interval"]
    spread = f" (interval {low:.3g} to {high:.3g})" if high is not None else " (lower bound)"
    console.print(f"{audit['kind']}\nempirical epsilon {audit['empirical_epsilon']:.4g}{spread}"
                  f"; accountant epsilon {audit['accountant_epsilon']:.4g} at delta "
                  f"{audit['delta']:g}", highlight=False)
    console.print(f"wrote {run_dir.path / 'audit.json'} and {plot}")
    if audit["violation"]:
        console.print("[bold red]VIOLATION[/]: the empirical epsilon is above the "
                      "accountant's: the mechanism or its accounting is wrong")
        return 1
    return 0


def _add_audit_parser(sub: Any) -> None:
    audit = sub.add_parser("audit", help="empirical privacy audit of a run made with "
                                         "privacy.audit = true (audit.json, plots/audit.png)")
    audit.add_argument("run_dir")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment")
    run.add_argument("config", nargs="?", help="TOML config (default: built-in quickstart)")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config key (repeatable)")
    run.add_argument("--output", help="run directory to create (default: runs/<name>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its checkpoint")
    run.add_argument("--central", action="store_true",
                     help="train the centralized reference instead (engine.backend=central: "
                          "the pooled client data, as many examples as the federated run)")
    report = sub.add_parser("report", help="redraw plots and print the summary of a run")
    report.add_argument("run_dir")
    sweep = sub.add_parser("sweep", help="run a grid of experiments, skip finished ones, "
                                         "tabulate and plot")
    sweep.add_argument("config", help="TOML config with a [sweep.grid] table")
    sweep.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one key of the base config (repeatable)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[VALUES]",
                       help="run only these values of one grid key, e.g. run.seed=[0] or "
                            "model=mlp (repeatable; finished runs still fill the tables)")
    sweep.add_argument("--output", help="sweep directory (default: <sweep.output_dir>/<name>)")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="run N points at a time, each in its own process (runtimes "
                            "inprocess and central)")
    certs = sub.add_parser("certs", help="create a CA, a SuperLink TLS certificate and SuperNode "
                                         "authentication keys for a deployment")
    certs.add_argument("output", help="new directory for the files")
    certs.add_argument("--host", action="append", metavar="NAME_OR_IP",
                       help="SuperLink host name or IP the certificate is valid for "
                            "(repeatable; default: localhost and 127.0.0.1)")
    certs.add_argument("--supernodes", type=int, default=3, help="key pairs to create")
    sub.add_parser("config", help="list every config key with its default")
    _add_audit_parser(sub)
    return parser


COMMANDS = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "certs": cmd_certs,
            "config": cmd_config, "audit": cmd_audit}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(soft_wrap=True)  # long paths stay on one line, also in logs
    try:
        return COMMANDS[args.command](args, console)
    except ConfigError as error:
        print(f"fedtune: error: {error}", file=sys.stderr)  # one line, never wrapped
        return 2
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted[/]: finished rounds are in the run directory")
        return 130


if __name__ == "__main__":
    sys.exit(main())
