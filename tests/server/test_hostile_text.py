"""What one client writes into the run's files is capped and printable, and no reply makes a run
unresumable (issue 25, item 6)."""

from __future__ import annotations

import csv

from fedtune.config import to_run_config
from fedtune.engine.inprocess import InProcessGrid
from fedtune.errors import MAX_REASON, one_line
from fedtune.server.app import run_federated
from tests import hostile_client as hostile
from tests.conftest import rows_of, tiny_config

LOCAL_DP = ["privacy.mode=local", "privacy.noise_multiplier=0.8", "privacy.delta=1e-3"]


def _printable(text: str) -> bool:
    return text.isprintable() and "\x1b" not in text


def test_one_line_strips_escapes_and_caps():
    assert one_line("a\x1b[31mred\x1b[0m\nnext\r\x00 \ud800 \u202eevil") == "a red next ? evil"
    cut = one_line("x" * 300_000)
    assert len(cut) == MAX_REASON and cut.endswith("[... cut, 300,000 characters in all]")
    assert one_line("short") == "short"


def test_a_huge_or_escaped_reason_is_capped_and_the_run_still_resumes(tmp_path):
    """A 300,000-character metric name, a 1 MB "budget spent" reason, an error full of ANSI
    escapes: each client is recorded under its own id with a capped, printable reason;
    clients.csv stays small, and the run resumes."""
    attacks = {0: hostile.LONG_NAME, 1: hostile.HUGE_DECLINE, 2: hostile.ESCAPES}
    config = tiny_config(tmp_path, *LOCAL_DP, "run.rounds=1")
    app = hostile.hostile_app(attacks)

    def run(config):
        return run_federated(InProcessGrid(app, to_run_config(config), 4), config).path

    run_dir = run(config)
    assert (run_dir / "clients.csv").stat().st_size < 2000  # 4 rows (3.7 MB over two rounds)
    rows = {int(r["client_id"]): r for r in rows_of(run_dir / "clients.csv")}
    long_name, decline, escapes, honest = (rows[c] for c in range(4))
    assert long_name["status"] == "rejected"
    assert long_name["reason"].startswith("unexpected metric 'mmmm")
    assert decline["status"] == "rejected" and decline["reason"].startswith("spent spent")
    assert escapes["status"] == "failed"
    assert escapes["reason"] == "RuntimeError: pwned"  # no escape, no forged line
    assert honest["status"] == "ok"
    for row in (long_name, decline, escapes):
        assert len(row["reason"]) <= MAX_REASON and _printable(row["reason"])

    config.run.rounds, config.run.resume = 2, True
    resumed = run(config)
    assert [r["round"] for r in rows_of(resumed / "metrics.csv")] == ["1", "2"]
    assert len(rows_of(resumed / "clients.csv")) == 8


def test_a_run_whose_files_hold_a_huge_field_still_resumes(tmp_path):
    """clients.csv written before the cap (a 600 kB reason) no longer trips the csv module's
    field limit (131,072 characters) on resume."""
    config = tiny_config(tmp_path, "run.rounds=1")
    app = hostile.hostile_app({})
    run_dir = run_federated(InProcessGrid(app, to_run_config(config), 4), config).path
    with (run_dir / "clients.csv").open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow([1, 3, "", "", "", "", "rejected", "x" * 600_000, ""])
    config.run.rounds, config.run.resume = 2, True
    resumed = run_federated(InProcessGrid(app, to_run_config(config), 4), config).path
    assert [r["round"] for r in rows_of(resumed / "metrics.csv")] == ["1", "2"]
