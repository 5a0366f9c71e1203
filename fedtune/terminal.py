"""What a person watching a run sees: the live bar, one line per round, the final screen.

With ``fedtune.cli`` (the commands) this is the only module that knows about terminals. A
run prints, in this order: a spinner naming each stage before the rounds, a header with a
legend line, then one line per round, printed once, as the round ends, under a live bar that
names the round and the phase running now (``train 1/2 clients``, ``evaluate``, ``test``).
The numbers of a round's line are rounded once, from the value metrics.csv holds, so
``fedtune report`` prints the same digits. The final screen: the result, ε spent and the
audit's empirical ε where the run has them, the wall and round times (named apart), and
where the plots are and which commands come next.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.spinner import Spinner

from fedtune.audit import audit_line
from fedtune.config import Config
from fedtune.results.run_dir import json_safe
from fedtune.tables.privacy_modes import PRIVACY_MODES

NORMAL, QUIET, JSON = "normal", "quiet", "json"  # what a command prints (--quiet, --json)

# (metrics.csv column, title, width, format); bytes_up is shown in MB
ROW_COLUMNS = (
    ("round", "round", 5, ".0f"),
    ("train_loss", "trainloss", 9, ".4f"),
    ("eval_loss", "testloss", 8, ".4f"),
    ("eval_accuracy", "testacc", 7, ".4f"),
    ("eval_macro_f1", "testF1", 7, ".4f"),
    ("federated_eval_accuracy", "clientacc", 9, ".4f"),
    ("clients_ok", "ok", 3, ".0f"),
    ("clients_failed", "fail", 4, ".0f"),
    ("bytes_up", "MBup", 7, ".4g"),
    ("wall_s", "sec", 6, ".1f"),
)
EPSILON_FORMAT = ".4g"
EPSILON_COLUMN = ("epsilon_shown", "ε", 7, EPSILON_FORMAT)  # a mode that spends a budget
LEGEND = (
    "  trainloss: the sampled clients' mean   test*: the global model on the held-out global "
    "test set",
    "  clientacc: the clients' local test splits   ok/fail: clients   MBup: sent up   sec: the "
    "round's time",
)
EPSILON_LEGEND = "  ε: privacy spent so far (local DP: the highest client's)"


def shown_value(value: Any) -> float | None:
    """A metric as metrics.csv holds it (6 significant digits), so that a live line and a
    line read back from the CSV round alike."""
    if value in (None, ""):
        return None
    return float(f"{float(value):.6g}")  # NaN and inf stay what they are


def cell(value: Any, key: str, spec: str) -> str:
    """``value`` as a terminal shows it: "-" when missing, bytes in MB."""
    number = shown_value(value)
    if number is None:
        return "-"
    if key == "bytes_up":
        number /= 1e6
    return f"{number:{spec}}"


def row_columns(privacy: bool) -> tuple[tuple[str, str, int, int], ...]:
    return ROW_COLUMNS + ((EPSILON_COLUMN,) if privacy else ())


def row_values(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row (a ``RoundRow``'s fields or a metrics.csv line) with the ε to show:
    central DP's ε, or local DP's highest client ε."""
    epsilon = row.get("epsilon")
    if epsilon in (None, ""):
        epsilon = row.get("max_client_epsilon")
    return {**row, "epsilon_shown": epsilon}


def header_line(privacy: bool) -> str:
    return " ".join(f"{title:>{width}}" for _, title, width, _ in row_columns(privacy))


def legend_lines(privacy: bool) -> list[str]:
    return [*LEGEND, *([EPSILON_LEGEND] if privacy else [])]


def row_line(row: dict[str, Any], privacy: bool) -> str:
    values = row_values(row)
    line = " ".join(f"{cell(values.get(key), key, spec):>{width}}"
                    for key, _, width, spec in row_columns(privacy))
    if shown_value(row.get("personal_mean")) is not None:  # a round with personal evaluation
        line += (f"   every client's own model: mean {cell(row['personal_mean'], '', '.4f')}"
                 f", p10 {cell(row.get('personal_p10'), '', '.4f')}")
    return line


def spends_budget(config: Config) -> bool:
    return PRIVACY_MODES[config.privacy.mode].spends_budget


def print_rows(console: Console, rows: list[dict[str, Any]], privacy: bool) -> None:
    """The header, the legend and one line per round (``fedtune report``)."""
    console.print(header_line(privacy), style="bold", highlight=False)
    for line in legend_lines(privacy):
        console.print(line, style="dim", highlight=False)
    for row in rows:
        console.print(row_line(row, privacy), highlight=False)


class Status:
    """A spinner line naming what runs now (rich's ``console.status``, except that what is
    written to sys.stdout / sys.stderr meanwhile goes where they point: the run's log.txt)."""

    def __init__(self, console: Console, text: str) -> None:
        self.spinner = Spinner("dots", text, style="status.spinner")
        self.live = Live(self.spinner, console=console, transient=True,
                         refresh_per_second=12.5, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def update(self, text: str) -> None:
        self.spinner.update(text=text)

    def stop(self) -> None:
        self.live.stop()


class RichReporter:
    """What a run shows: a spinner naming each stage before the rounds (loading data, starting
    workers), then a live bar (round, phase, clients done in it, last loss and accuracy, time)
    above one line per round. ``--quiet``: nothing; ``--json``: one JSON line per round on
    stdout."""

    def __init__(self, console: Console, mode: str = NORMAL,
                 callbacks: Sequence[Any] = ()) -> None:
        self.console = console
        self.mode = mode
        self.callbacks = list(callbacks)  # a caller's fedtune.Callback objects, for the server
        self.status: Any = None
        self.progress = Progress(
            TextColumn("[bold]{task.fields[where]}"),
            TextColumn("{task.fields[phase]:<9}"),
            BarColumn(),
            TextColumn("{task.fields[count]:<12}"),
            TextColumn("last: loss {task.fields[loss]}  acc {task.fields[acc]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            # what is written to sys.stdout / sys.stderr while the bar shows (Ray's forwarded
            # worker output included) belongs to the run's log.txt, not above the bar
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.task_id: Any = None
        self.rounds = 0
        self.privacy = False
        self.run_dir = ""

    def stage(self, text: str) -> None:
        if self.mode != NORMAL:
            return
        if not self.console.is_terminal:  # a log or a pipe: one line per stage
            self.console.print(f"{text} ...", highlight=False)
        elif self.status is None:
            self.status = Status(self.console, text)
        else:
            self.status.update(text)

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def start(self, config: Config, run_dir: Any) -> None:
        self._stop_status()
        self.rounds = config.run.rounds
        self.privacy = spends_budget(config)
        self.run_dir = str(run_dir.path)
        if self.mode != NORMAL:
            return
        self.console.print(header_line(self.privacy), style="bold", highlight=False)
        for line in legend_lines(self.privacy):
            self.console.print(line, style="dim", highlight=False)
        if not self.console.is_terminal:  # a pipe, a log, a notebook: the round lines only
            return
        self.progress.start()
        self.task_id = self.progress.add_task("fl", total=None, where="waiting for the clients",
                                              phase="", count="", loss="-", acc="-")

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        """``phase`` of ``server_round`` has ``done`` of ``total`` clients (or steps) done;
        called as a phase starts (done 0) and as its clients finish."""
        if self.task_id is None:
            return
        self.progress.update(self.task_id, completed=done, total=total or None,
                             where=f"round {server_round}/{self.rounds}", phase=phase,
                             count=f"{done}/{total} clients" if total else "")

    def round_end(self, row: Any) -> None:
        if self.mode == JSON:
            line = json.dumps(json_safe({**row.__dict__, "run_dir": self.run_dir}))
            print(line, file=self.console.file, flush=True)
        if self.mode != NORMAL:
            return
        if row.round == self.rounds:  # the bar goes before the last line is drawn
            self.close()
            self.task_id = None
            self.console.print(row_line(row.__dict__, self.privacy), highlight=False)
            self.stage("saving the model, plots and summary; stopping the clients")
            return
        if self.task_id is not None:  # the bar moves on before the line is drawn above it
            self.progress.update(self.task_id, completed=0, total=None,
                                 where=f"round {row.round + 1}/{self.rounds}",
                                 phase="sampling", count="",
                                 loss=cell(row.train_loss, "train_loss", ".4f"),
                                 acc=cell(row.eval_accuracy, "eval_accuracy", ".4f"))
            self.progress.refresh()  # a line printed under a live bar redraws its last render
        self.console.print(row_line(row.__dict__, self.privacy), highlight=False)

    def finish(self, summary: dict[str, Any], run_dir: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stop_status()
        if self.progress.live.is_started:
            self.progress.stop()


class SweepReporter:
    """Progress of one run inside a sweep: a transient status line on a terminal (which point,
    which stage or round), nothing elsewhere; the sweep prints a line when the run ends."""

    def __init__(self, console: Console, mode: str) -> None:
        self.console = console
        self.show = mode == NORMAL and console.is_terminal
        self.status: Any = None
        self.point = ""
        self.rounds = 0

    def begin(self, point: str) -> None:
        self.point = point
        self.stage("starting")

    def _say(self, text: str) -> None:
        if not self.show:
            return
        if self.status is None:
            self.status = Status(self.console, "")
        self.status.update(f"{self.point}: {text}")

    def stage(self, text: str) -> None:
        self._say(text)

    def start(self, config: Config, run_dir: Any) -> None:
        self.rounds = config.run.rounds

    def phase(self, server_round: int, phase: str, done: int, total: int) -> None:
        counted = f" {done}/{total} clients" if total else ""
        self._say(f"round {server_round}/{self.rounds} {phase}{counted}")

    def round_end(self, row: Any) -> None:
        pass

    def finish(self, summary: dict[str, Any], run_dir: Any) -> None:
        pass

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


# --- the final screen -------------------------------------------------------------------------

def result_line(summary: dict[str, Any]) -> str:
    """The run's result in one line: final and best accuracy, the majority class."""
    final = summary["final"]
    return (f"final global test accuracy {final['eval_accuracy']:.4f}, macro-F1 "
            f"{final['eval_macro_f1']:.4f} (majority class "
            f"{summary['dataset']['majority_class_accuracy']:.4f}); best "
            f"{summary['best']['eval_accuracy']:.4f} at round {summary['best']['round']}")


def privacy_line(summary: dict[str, Any]) -> str:
    """ε spent at δ, with the accountant (a private run)."""
    privacy = summary.get("privacy") or {}
    mode = PRIVACY_MODES.get(privacy.get("mode", ""))
    private = mode is not None and mode.mechanism
    parts = []
    if private:
        spent = shown_value(privacy["epsilon"])  # "inf" in JSON reads back as inf
        # each client has its own accountant: the run's ε is the highest client's
        who = " (the highest client's)" if mode.client_accountants else ""
        parts.append(f"{privacy['mode']} DP: ε spent {spent:{EPSILON_FORMAT}}{who} at δ "
                     f"{privacy['delta']:g} ({privacy['accountant']} accountant)")
        if privacy.get("private") is False:
            parts.append("NOT PRIVATE: privacy.insecure_reproducible_noise drew the noise from "
                         "run.seed; anyone with this run's config can remove it")
    return "; ".join(parts)


PERSONAL_LABELS = {"global": "global model", "personalised": "personalised",
                   "local_only": "local only"}


def personal_line(summary: dict[str, Any]) -> str:
    """Every client's accuracy on its local test split (personal evaluation): mean and 10th
    percentile per model, and the share of clients worse off than alone or than global."""
    personal = summary.get("personal")
    if not personal:
        return ""
    models = personal["models"]
    clients = max(m["clients"] for m in models.values())
    parts = [f"{PERSONAL_LABELS.get(name, name)} mean {m['mean']:.3f} p10 {m['p10']:.3f}"
             for name, m in models.items() if m["mean"] is not None]
    worse = [f"{share:.0%} of clients worse than {what}"
             for key, what in (("worse_than_local_only", "alone"), ("worse_than_global",
                                                                     "the global model"))
             if (share := personal.get(key)) is not None]
    return (f"per-client accuracy ({clients} clients, local test splits): "
            + "; ".join(parts) + (f" ({', '.join(worse)})" if worse else ""))


def times_line(wall_s: float, summary: dict[str, Any]) -> str:
    """The command's wall time and the rounds' time (summary.json total_time_s), named."""
    return (f"took {wall_s:.1f}s wall (start-up, workers and saving included); rounds "
            f"{summary['total_time_s']:.1f}s (summary.json total_time_s)")


def next_lines(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """Where the plots are and what to run next."""
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    lines = [f"plots: {run_dir / 'plots'}/{{{','.join(plots)}}}" if len(plots) > 1 else
             f"plots: {run_dir / 'plots' / plots[0]}" if plots else ""]
    lines.append(f"next: fedtune report {run_dir}   (the summary again, plots redrawn)")
    if (run_dir / "audit.json").is_file():
        lines.append(f"      fedtune audit {run_dir}   (the empirical privacy audit again)")
    lines.append(f"      fedtune run --resume {run_dir} --set run.rounds="
                 f"{summary['rounds_completed'] * 2}   (more rounds)")
    lines.append("      python -c \"import fedtune; print(fedtune.load_run('"
                 f"{run_dir}').metrics)\"   (the results as data)")
    return [line for line in lines if line]


def read_audit(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "audit.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def print_final(console: Console, run_dir: Path, summary: dict[str, Any],
                centralized: str = "") -> None:
    """The result, why the run stopped early (if it did), privacy, the audit and the
    centralized reference, each in one line."""
    stopped = (f"stopped after round {summary['rounds_completed']}: {summary['stop_reason']}"
               if summary.get("stop_reason") else "")
    audit = read_audit(run_dir)
    for line in (result_line(summary), personal_line(summary), stopped, privacy_line(summary),
                 f"audit: {audit_line(audit)}" if audit else "", centralized):
        if line:
            console.print(line, highlight=False)
