"""Grids of runs: expand, run what is not finished yet, collect one row per run, summarise.

A sweep file is an ordinary config file plus a ``[sweep]`` table::

    [sweep]
    name = "privacy-utility"
    output_dir = "sweeps"            # the sweep directory is <output_dir>/<name>
    metric = "eval_accuracy"         # a final metric of summary.json to tabulate

    [sweep.grid]                      # every combination of these values is one run
    "privacy.mode" = ["local", "central"]
    "run.seed" = [0, 1, 2]

A grid key may name several config keys joined by commas; its values are then lists that set
them together (one axis, not a product): ``"model.transfer,client.lr" = [["full", 1e-4],
["lora", 1e-3]]``. ``columns = ["eval_macro_f1", "total_bytes", ...]`` adds result columns to
the table (mean over seeds); ``bytes_curves = true`` asks for a plot of every run's accuracy against
the round and against the bytes sent so far.

A grid key without a dot names *variants*: its values are tables of keys set together, each
with a ``name`` (e.g. a model with its own learning rate)::

    model = [{ name = "minilm", "model.kind" = "hf", "client.lr" = 5e-4 },
             { name = "mlp", "model.kind" = "mlp", "client.lr" = 0.05 }]

``[sweep.reference]`` sets keys for reference runs (e.g. ``"privacy.mode" = "none"``): one per
combination of the grid keys it does not set, other than ``x``, whose column stays empty. The
plot draws them as horizontal lines.

Each run gets its own run directory ``<sweep dir>/runs/<slug>``. A run whose summary.json says
``finished`` and whose config.toml is the run's config is skipped, so a sweep stopped with
Ctrl-C continues where it was; an unfinished run directory, or one made with other settings (the
sweep file changed since), is started again from scratch. ``results.csv`` has one row per run (grid values,
final metrics); ``table.csv`` / ``table.md`` give mean ± std of the metric over ``run.seed`` for
every other combination. Optional ``[sweep]`` keys, each naming a grid key: ``x`` and ``series``
(final metric against ``x``, ``plot.png``), ``rows`` (``table_wide.md``: one row per value of
that key, one column per combination of the other keys) and ``curves`` (``curves.png``: the
metric against the round, mean ± std band over seeds, one line per value of that key, one panel
per combination of the other keys).

``centralized = ["examples", "converged"]`` adds centralized reference rows
(``engine.backend = "central"``, ``fedtune.centralized``): one per combination of the grid
values that can change a centralized run (``fedtune.config.affects_centralized``: the data,
model, local optimizer, rounds, seed, clients per round); the other grid keys read
"centralized" (same examples as the federated runs) or "centralized (converged)", and when
every grid key changes a centralized run a ``training`` column tells the rows apart. The
tables then have a ``gap_to_centralized`` column (the matching "examples" reference minus the
row's mean), the curves a centralized line. A base config with ``run.reference = true`` implies
"examples", and its points reuse the sweep's reference runs for their summary.json.
``--parallel N`` (``run_sweep(..., parallel=N)``) runs N points at a time in child processes.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import (
    Config,
    ConfigError,
    ConfigWarning,
    NoEffect,
    affects_centralized,
    centralized_config,
    from_dict,
    keys_without_effect,
    parse_override,
    read_toml,
    toml_value,
)
from fedtune.results.run_dir import is_finished
from fedtune.studies.parallel import check_parallel, run_points

SEED_KEY = "run.seed"
FINAL_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_loss", "train_loss",
                 "federated_eval_accuracy", "attack_success_rate", "personal_mean", "personal_p10",
                 "personal_worst")
# audit_epsilon: the audit's estimate (central DP) or lower bound (local); audit_bound: its
# lower bound, the one number that can contradict the accountant
TOTALS = ("best_eval_accuracy", "epsilon", "audit_epsilon", "audit_bound", "total_bytes",
          "total_bytes_up", "total_time_s", "malicious_filtered", "benign_filtered",
          "local_only_mean", "local_only_p10", "worse_than_local_only")
GRID_KEY_OPTIONS = ("x", "series", "rows", "curves")  # [sweep] keys whose value is a grid key
# what a centralized row's grid keys that do not change it read, per sweep.centralized kind
CENTRAL_LABELS = {"examples": "centralized", "converged": "centralized (converged)"}
TRAINING_KEY = "training"  # tells rows apart when every grid key changes a centralized run


@dataclass
class SweepSpec:
    """A base config, the grid over some of its keys, and where the sweep lives."""

    name: str
    output_dir: str
    metric: str
    base: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    extra: dict[str, Any] = field(default_factory=dict)  # other [sweep] keys, for callers
    reference: dict[str, Any] = field(default_factory=dict)  # keys of the reference runs
    selection: dict[str, list[Any]] = field(default_factory=dict)  # --grid: what may run
    centralized: list[str] = field(default_factory=list)  # kinds of centralized rows

    def selects(self, run: SweepRun) -> bool:
        """Whether ``--grid`` lets ``run`` run (a centralized row: by the keys it has)."""
        return all(run.values.get(k) in allowed for k, allowed in self.selection.items()
                   if not run.central or k in central_keys(self))

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid."""

    values: dict[str, Any]
    config: Config
    slug: str
    given: frozenset[str] = frozenset()  # the keys the sweep file and the grid set
    central: str = ""  # the sweep.centralized kind of a centralized row


def _check_key(key: str) -> tuple[str, str]:
    if key.count(".") != 1:
        raise ConfigError(f"sweep.grid key {key!r} is not allowed: must be section.key")
    section, name = key.split(".")
    return section, name


def _axis_keys(key: str) -> list[str]:
    """The names one grid axis contributes to a run's values: its config key, the keys of a
    linked axis ("a.b,c.d"), or the axis name of a variant axis (no dot)."""
    if "." not in key:
        return [key]
    keys = [part.strip() for part in key.split(",")]
    for part in keys:
        _check_key(part)
    return keys


def grid_keys(spec: SweepSpec) -> list[str]:
    """Every name the grid sets in a run's values, in order."""
    return [key for axis in spec.grid for key in _axis_keys(axis)]


def parse_selection(texts: Iterable[str], grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``--grid key=[values]``: run only these values of a grid key (variants by name); a
    value the grid does not hold is an error (unquoted words are not TOML strings:
    ``strategy.name=[fedavg,scaffold]`` is one string that matches nothing)."""
    selection: dict[str, list[Any]] = {}
    for text in texts:
        key, _, raw = text.partition("=")
        key = key.strip()
        if key not in grid:
            raise ConfigError(f"--grid {text!r} is not allowed: the key must be one of "
                              + ", ".join(grid))
        value = toml_value(raw)
        values = value if isinstance(value, list) else [value]
        known = [v["name"] if isinstance(v, dict) else v for v in grid[key]]
        missing = [v for v in values if v not in known]
        if missing:
            example = ", ".join(json.dumps(v) for v in known[:2])
            raise ConfigError(
                f"--grid {text!r} is not allowed: {missing[0]!r} is none of the values of "
                f"sweep.grid.{key}: " + ", ".join(repr(v) for v in known)
                + f" (write TOML, strings quoted: {key}=[{example}])")
        selection[key] = values
    return selection


def load_sweep(path: str | Path, overrides: Iterable[str] = (),
               selection: Iterable[str] = ()) -> SweepSpec:
    """Read a sweep file; ``--set`` overrides change the base config (not the grid), ``--grid``
    ``selection`` limits what runs (finished runs outside it still fill the tables)."""
    file = Path(path)
    raw = read_toml(file, "sweep file")
    sweep = raw.pop("sweep", None)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("grid"), dict) or not sweep["grid"]:
        raise ConfigError(f"sweep file {str(path)!r} needs a [sweep.grid] table with at least "
                          "one key, e.g. \"run.seed\" = [0, 1, 2]")
    grid = dict(sweep.pop("grid"))
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key} = {values!r} is not allowed: must be a "
                              "non-empty list of values")
        width = len(_axis_keys(key))
        if "." not in key:
            if not all(isinstance(v, dict) and "name" in v for v in values):
                raise ConfigError(f"sweep.grid.{key} is not allowed: a key without a dot must "
                                  "list variants, tables with a name and section.key entries")
        elif width > 1 and not all(isinstance(v, list) and len(v) == width for v in values):
            raise ConfigError(f"sweep.grid.\"{key}\" = {values!r} is not allowed: must be a "
                              f"list of lists of {width} values, one per key")
    reference = dict(sweep.pop("reference", {}))
    for key in reference:
        _check_key(key)
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    for option in GRID_KEY_OPTIONS:
        if option in sweep and sweep[option] not in grid:
            raise ConfigError(f"sweep.{option} = {sweep[option]!r} is not allowed: must be one "
                              "of the grid keys " + ", ".join(repr(k) for k in grid))
    if not isinstance(sweep.get("bytes_curves", False), bool):
        raise ConfigError(f"sweep.bytes_curves = {sweep['bytes_curves']!r} is not allowed: must "
                          "be true or false")
    metric = sweep.pop("metric", "eval_accuracy")
    if metric not in FINAL_METRICS:
        raise ConfigError(f"sweep.metric = {metric!r} is not allowed: must be one of "
                          + ", ".join(repr(m) for m in FINAL_METRICS))
    columns = sweep.get("columns", [])
    if not isinstance(columns, list) or not set(columns) <= set(FINAL_METRICS + TOTALS):
        raise ConfigError(f"sweep.columns = {columns!r} is not allowed: must be a list of "
                          + ", ".join(repr(c) for c in FINAL_METRICS + TOTALS))
    spec = SweepSpec(name=str(sweep.pop("name", file.stem)),
                     output_dir=str(sweep.pop("output_dir", "sweeps")),
                     metric=metric, base=raw, grid=grid, extra=sweep, reference=reference,
                     selection=parse_selection(selection, grid),
                     centralized=_centralized_kinds(sweep.pop("centralized", []), raw))
    runs = expand_reference(spec) + expand(spec)  # every point must be a valid config
    expand_central(spec)
    for ignored in unused_by_every_point(runs):
        warnings.warn(f"{ignored.message()} (and in every other point of the sweep)",
                      ConfigWarning, stacklevel=2)
    return spec


def unused_by_every_point(runs: list[SweepRun]) -> list[NoEffect]:
    """Keys the sweep sets that no point uses (a key that some points use, such as FedProx's
    mu in a sweep over strategies, is fine): as the first point reports them."""
    per_point = [{n.key: n for n in keys_without_effect(run.config, run.given)} for run in runs]
    common = set.intersection(*(set(found) for found in per_point)) if per_point else set()
    return [found for key, found in per_point[0].items() if key in common] if common else []


def _centralized_kinds(kinds: Any, base: dict[str, Any]) -> list[str]:
    """``sweep.centralized``, with "examples" added when the base asks every run for its
    reference (``run.reference = true``)."""
    if not isinstance(kinds, list) or not set(kinds) <= set(CENTRAL_LABELS):
        raise ConfigError(f"sweep.centralized = {kinds!r} is not allowed: must be a list of "
                          + ", ".join(repr(k) for k in CENTRAL_LABELS))
    if base.get("run", {}).get("reference") is True and "examples" not in kinds:
        kinds = ["examples", *kinds]
    return list(dict.fromkeys(kinds))


def _slug(values: dict[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
        parts.append(f"{key.split('.')[-1]}={text}")
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "_".join(parts))


def _overrides(axis: str, value: Any) -> dict[str, Any]:
    """The config keys one grid value sets: the key itself, a variant's entries, or the keys
    of a linked axis."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    keys = _axis_keys(axis)
    return dict(zip(keys, value, strict=True)) if len(keys) > 1 else {axis: value}


def _labels(axis: str, value: Any) -> dict[str, Any]:
    """What a run's values record for one grid value (a variant by its name)."""
    if isinstance(value, dict):
        return {axis: value["name"]}
    return _overrides(axis, value)


def _build(spec: SweepSpec, overrides: dict[str, Any], values: dict[str, Any],
           slug: str) -> SweepRun:
    raw = {section: dict(table) for section, table in spec.base.items()}
    for key, value in overrides.items():
        section, name = _check_key(key)
        raw.setdefault(section, {})[name] = value
    try:
        config = from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"sweep point {values}: {err}") from None
    config.run.dir = str(spec.directory / "runs" / slug)
    if config.tracking.mlflow and not config.tracking.mlflow_experiment:
        config.tracking.mlflow_experiment = spec.name  # the points side by side in MLflow
    kept = {k: values.get(k) for k in central_keys(spec)}
    if config.run.reference and None not in kept.values():
        config.run.reference_dir = str(spec.directory / "runs" / _central_slug("examples", kept))
    given = frozenset(f"{section}.{name}" for section, table in raw.items() for name in table)
    return SweepRun(values, config, slug, given)


def _combinations(spec: SweepSpec, axes: list[str]
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(config overrides, recorded values) of every combination of the ``axes``' values."""
    for combination in itertools.product(*(spec.grid[axis] for axis in axes)):
        overrides: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for axis, value in zip(axes, combination, strict=True):
            overrides.update(_overrides(axis, value))
            values.update(_labels(axis, value))
        yield overrides, values


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every combination of the grid values, as validated configs."""
    runs = [_build(spec, overrides, values, _slug(values))
            for overrides, values in _combinations(spec, list(spec.grid))]
    if needs_training_key(spec):
        for run in runs:
            run.values[TRAINING_KEY] = "federated"
    return runs


def _changes_centralized(spec: SweepSpec, axis: str) -> bool:
    """Whether some value of grid ``axis`` sets a key that changes a centralized run."""
    return any(affects_centralized(key) for value in spec.grid[axis]
               for key in _overrides(axis, value))


def central_axes(spec: SweepSpec) -> list[str]:
    """The grid axes that change a centralized run (the rest do not: strategies, privacy...)."""
    return [axis for axis in spec.grid if _changes_centralized(spec, axis)]


def central_keys(spec: SweepSpec) -> list[str]:
    """The names the ``central_axes`` set in a run's values."""
    return [key for axis in central_axes(spec) for key in _axis_keys(axis)]


def needs_training_key(spec: SweepSpec) -> bool:
    """Centralized rows whose grid values alone would not tell them from federated ones."""
    return bool(spec.centralized) and len(central_axes(spec)) == len(spec.grid)


def table_keys(spec: SweepSpec) -> list[str]:
    """What the rows of the sweep's tables are grouped by (the seed included)."""
    return grid_keys(spec) + ([TRAINING_KEY] if needs_training_key(spec) else [])


def _central_slug(kind: str, kept: dict[str, Any]) -> str:
    return ("centralized" if kind == "examples" else "centralized-converged") + "_" + _slug(kept)


def expand_central(spec: SweepSpec) -> list[SweepRun]:
    """The centralized rows: one per ``sweep.centralized`` kind and combination of the grid
    values that change a centralized run; the other grid keys read the kind's label (``x``,
    if it is one of them, stays empty as in reference runs)."""
    runs = []
    axes = central_axes(spec)
    for kind in spec.centralized:
        label = CENTRAL_LABELS[kind]
        for overrides, kept in _combinations(spec, axes):
            slug = _central_slug(kind, kept)
            federated = _build(spec, overrides, kept, slug).config
            config = centralized_config(federated, kind, federated.run.dir)
            values = {k: kept[k] if k in kept else
                      None if k == spec.extra.get("x") else label for k in grid_keys(spec)}
            if needs_training_key(spec):
                values[TRAINING_KEY] = label
            runs.append(SweepRun(values, config, slug, central=kind))
    return runs


def expand_reference(spec: SweepSpec) -> list[SweepRun]:
    """One reference run per combination of the grid keys neither ``x`` nor the reference
    sets; ``x`` stays empty (None) in its row."""
    if not spec.reference:
        return []
    x_key = spec.extra.get("x")
    kept = [k for k in spec.grid if k != x_key and k not in spec.reference]
    runs = []
    for overrides, labels in _combinations(spec, kept):
        overrides.update(spec.reference)
        values = {k: labels.get(k, spec.reference.get(k)) for k in grid_keys(spec)}
        runs.append(_build(spec, overrides, values, "reference_" + _slug(labels)))
    return runs


OTHER_CODE = ("refuse", "rerun", "reuse")  # what to do with a finished run of other code


def code_of(run_dir: Path) -> dict[str, Any]:
    """The code a run was made with, from its env.json: git sha, the digest of fedtune's
    source (``fedtune.results.env_info.code_digest``) and the package versions."""
    env = run_dir / "env.json"
    recorded = json.loads(env.read_text(encoding="utf-8")) if env.is_file() else {}
    return {"git_sha": recorded.get("git_sha"), "code_sha256": recorded.get("code_sha256"),
            "packages": recorded.get("packages") or {}}


def code_difference(run_dir: Path) -> str:
    """How the code of the finished run in ``run_dir`` differs from the code running now
    ("" when it does not): fedtune's source, or a package version."""
    from fedtune.results.env_info import code_digest, package_versions

    made = code_of(run_dir)
    if made["code_sha256"] is None:
        return "it records no code digest (made before fedtune recorded one)"
    if made["code_sha256"] != code_digest():
        return (f"fedtune's source differs (code {made['code_sha256'][:12]}, git "
                f"{str(made['git_sha'])[:12]}; now {code_digest()[:12]})")
    now = package_versions()
    changed = [f"{name} {made['packages'].get(name)} (now {version})"
               for name, version in now.items() if made["packages"].get(name) != version]
    return "package versions differ: " + ", ".join(changed) if changed else ""


def result_row(run: SweepRun) -> dict[str, Any]:
    """Grid values and final metrics of a finished run, and the code that made it."""
    summary = json.loads((Path(run.config.run.dir) / "summary.json").read_text())
    row: dict[str, Any] = dict(run.values)
    for name in FINAL_METRICS:
        row[name] = summary["final"].get(name)
    row["best_eval_accuracy"] = summary["best"]["eval_accuracy"]
    spent = summary["privacy"].get("epsilon")
    row["epsilon"] = None if spent is None else float(spent)  # "inf" in JSON
    row["total_bytes"] = summary["total_bytes_up"] + summary["total_bytes_down"]
    row["total_bytes_up"] = summary["total_bytes_up"]
    row["total_time_s"] = summary["total_time_s"]
    # an attacked run: the shares of malicious / honest updates filtered, mean over rounds
    for name in ("malicious_filtered", "benign_filtered"):
        row[name] = summary.get("attack", {}).get(name)
    personal = summary.get("personal") or {}  # run.local_reference: each client trained alone
    alone = personal.get("models", {}).get("local_only") or {}
    row["local_only_mean"], row["local_only_p10"] = alone.get("mean"), alone.get("p10")
    row["worse_than_local_only"] = personal.get("worse_than_local_only")
    audit_path = Path(run.config.run.dir) / "audit.json"  # privacy.audit's results
    audit = json.loads(audit_path.read_text()) if audit_path.is_file() else {}
    row["audit_epsilon"] = float(audit["empirical_epsilon"]) if audit else None
    bound = audit.get("epsilon_lower_bound")
    row["audit_bound"] = None if bound is None else float(bound)
    row["run_dir"] = run.config.run.dir
    made = code_of(Path(run.config.run.dir))
    row["git_sha"] = made["git_sha"]
    row["code_sha256"] = made["code_sha256"]
    row["versions"] = " ".join(f"{name}={version}" for name, version in
                               sorted(made["packages"].items()) if version is not None)
    return row


def sweep_runs(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the sweep, in table order: centralized rows, reference runs, the grid."""
    return expand_central(spec) + expand_reference(spec) + expand(spec)


def run_sweep(spec: SweepSpec, run_one: Callable[[Config], Any],
              on_run: Callable[[int, int, SweepRun, str], None] | None = None,
              before_run: Callable[[int, int, SweepRun], None] | None = None,
              parallel: int = 1, other_code: str = "refuse") -> list[dict[str, Any]]:
    """Run every unfinished point that ``--grid`` selects with ``run_one``, ``parallel`` at a
    time (in child processes when more than one: ``fedtune.studies.parallel``; ``run_one``
    must then be importable by name); returns one result row per point run or finished
    before, in table order. ``before_run(number, total, run)`` before a point runs (one at a
    time only), ``on_run(done, total, run, status)`` as each point is skipped or finishes.
    Centralized rows run first when the points reuse them (``run.reference``).

    A finished point made by other code (``code_difference``: fedtune's source or a package
    version) would mix code versions in one table: ``other_code = "refuse"`` stops with a
    ConfigError before anything runs, ``"rerun"`` runs such points again (selected by
    ``--grid`` or not), ``"reuse"`` keeps them (results.csv records each row's code)."""
    if other_code not in OTHER_CODE:
        raise ConfigError(f"other_code = {other_code!r} is not allowed: must be one of "
                          + ", ".join(repr(o) for o in OTHER_CODE))
    runs = sweep_runs(spec)
    finished = [is_finished(Path(run.config.run.dir), run.config) for run in runs]
    stale = {i: why for i, run in enumerate(runs) if finished[i]
             and (why := code_difference(Path(run.config.run.dir)))}
    if stale and other_code == "refuse":
        first, why = next(iter(stale.items()))
        raise ConfigError(
            f"{len(stale)} finished runs of sweep {spec.name} were made by other code ({why}: "
            f"{runs[first].config.run.dir}); a table would mix code versions: --other-code "
            "rerun runs them again, --other-code reuse keeps them as they are")
    if other_code == "rerun":
        for index in stale:
            finished[index] = False
    todo = [i for i, run in enumerate(runs)
            if not finished[i] and (spec.selects(run) or i in stale)]
    check_parallel(parallel, [runs[i].config for i in todo])
    spec.directory.mkdir(parents=True, exist_ok=True)
    shown = [i for i in range(len(runs)) if finished[i] or i in todo]
    rows: dict[int, dict[str, Any]] = {}

    def record(index: int, status: str) -> None:
        rows[index] = result_row(runs[index])
        write_results(spec, [rows[i] for i in sorted(rows)])
        if on_run is not None:
            on_run(len(rows), len(shown), runs[index], status)

    for index in shown:
        if finished[index]:
            record(index, "skipped: finished before")
    for stage in _stages(runs, todo):
        for index in stage:
            run_dir = Path(runs[index].config.run.dir)
            if run_dir.exists():
                shutil.rmtree(run_dir)  # an interrupted or changed run starts again
        if parallel == 1:
            for index in stage:
                if before_run is not None:
                    before_run(len(rows) + 1, len(shown), runs[index])
                run_one(runs[index].config)
                record(index, "done")
        else:
            run_points([runs[i].config for i in stage], run_one, parallel,
                       lambda position, stage=stage: record(stage[position], "done"))
    return [rows[i] for i in sorted(rows)]


def _stages(runs: list[SweepRun], todo: list[int]) -> list[list[int]]:
    """The points to run, in stages: the centralized rows before points that reuse them."""
    if not any(runs[i].config.run.reference for i in todo):
        return [todo]
    return [[i for i in todo if runs[i].central], [i for i in todo if not runs[i].central]]


def write_results(spec: SweepSpec, rows: list[dict[str, Any]]) -> Path:
    path = spec.directory / "results.csv"
    columns = list(rows[0]) if rows else []
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v
                             for k, v in row.items()})
    return path
