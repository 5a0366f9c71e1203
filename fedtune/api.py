"""The Python API: run experiments from a notebook or a script, get their results as data.

    import fedtune

    result = fedtune.run("simulations/mlp_digits.toml", overrides={"run.rounds": 5})
    result.metrics                     # pandas DataFrame: metrics.csv, one row per round
    result.summary["final"]            # summary.json
    model = result.load_model()        # the saved global model
    model.predict(["a new review"])    # label names (a text model)

    fedtune.run(..., callbacks=[fedtune.EarlyStopping(patience=3)])  # hooks into the rounds

    study = fedtune.sweep("simulations/non_iid.toml", grid={"run.seed": [0]})
    study.table                        # mean ± std of the metric per grid point

``run`` and ``sweep`` take what ``fedtune run`` and ``fedtune sweep`` take - a config (a TOML
file, a ``Config``, or a dict of sections), overrides (``{"data.alpha": 0.1}`` or
``["data.alpha=0.1"]``), an output directory - check the config the same way (a bad value is a
``ConfigError`` before anything starts; an overridden key without effect too), print a line per
stage and per round (``progress=False``: nothing), send library warnings to the run's log.txt
(``verbose=True``: to the terminal) and write the same run directory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from fedtune.config import Config, ConfigError, config_from_raw, load_config, shown, to_dict
from fedtune.results.run_dir import check_creatable, default_run_path, is_empty_run_dir
from fedtune.results.run_log import capture_run_log, quiet_libraries
from fedtune.server.callbacks import Callback
from fedtune.tables.runtimes import RUNTIMES

if TYPE_CHECKING:
    import pandas as pd

    from fedtune.models.build import SavedModel

ConfigLike = str | Path | Config | Mapping[str, Any] | None
Overrides = Mapping[str, Any] | Iterable[str] | None


def _plain(value: Any) -> Any:
    """A NumPy scalar (or a list of them) as the Python value it holds."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _flat(overrides: Mapping[Any, Any]) -> dict[str, Any]:
    """``{"section.key": value}``; a section given as a dict (``{"data": {"alpha": 0.1}}``)
    is flattened."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"overrides key {shown(key)} is not allowed: must be a text "
                              "'section.key'")
        if isinstance(value, Mapping) and "." not in key:
            flat.update(_flat({f"{key}.{name}" if isinstance(name, str) else name: inner
                               for name, inner in value.items()}))
        else:
            flat[key] = value
    return flat


def override_texts(overrides: Overrides) -> list[str]:
    """``{"data.alpha": 0.1}`` (Python or NumPy values; ``{"data": {"alpha": 0.1}}`` too) or
    ``["data.alpha=0.1"]`` as ``--set`` texts."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        texts = []
        for key, value in _flat(overrides).items():
            try:  # a TOML literal of each value: the same parser as --set reads it back exactly
                literal = tomli_w.dumps({"v": _plain(value)})[4:].strip()
            except TypeError:
                raise ConfigError(f"overrides[{key!r}] = {shown(value)} is not allowed: must be "
                                  "a number, a text, true/false or a list of them") from None
            texts.append(f"{key}={literal}")
        return texts
    if isinstance(overrides, str):
        raise ConfigError(f"overrides = {shown(overrides)} is not allowed: must be a dict "
                          "{'section.key': value} or a list of 'section.key=value'")
    texts = list(overrides)
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"overrides item {shown(text)} is not allowed: must be a text "
                              "'section.key=value'")
    return texts


def resolve_config(config: ConfigLike = None, overrides: Overrides = None) -> Config:
    """The validated Config of ``config`` with ``overrides`` applied."""
    texts = override_texts(overrides)
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, texts)
    if isinstance(config, Config):
        return config_from_raw(to_dict(config), texts, resolved=True)
    if isinstance(config, Mapping):
        return config_from_raw(config, texts)
    raise ConfigError(f"config = {config!r} is not allowed: must be a TOML file path, a "
                      "fedtune Config or a dict of sections")


@dataclass(frozen=True)
class RunResult:
    """A run directory, read as data (``load_run`` opens an existing one)."""

    run_dir: Path

    @cached_property
    def config(self) -> Config:
        """The resolved config the run was made with (config.toml)."""
        return load_config(self.run_dir / "config.toml", resolved=True)

    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.csv: one row per round (empty cells are NaN)."""
        return _frame(self.run_dir / "metrics.csv")

    @property
    def clients(self) -> pd.DataFrame:
        """clients.csv: one row per sampled client per round."""
        return _frame(self.run_dir / "clients.csv")

    @property
    def partitions(self) -> pd.DataFrame:
        """partitions.csv: examples per client and label."""
        return _frame(self.run_dir / "partitions.csv")

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: final and best metrics, bytes, time, privacy."""
        import json

        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))

    @property
    def plots(self) -> dict[str, Path]:
        """The run's figures by name (accuracy_loss, partitions, epsilon)."""
        return {path.stem: path for path in sorted((self.run_dir / "plots").glob("*.png"))}

    def load_model(self, which: str = "final") -> SavedModel:
        """The saved global model (``which = "best"``: the best round's, with
        ``run.save_best``), with ``predict`` and ``predict_proba`` on new inputs."""
        from fedtune.models.build import load_predictor

        folders = {"final": self.run_dir / "model", "best": self.run_dir / "model_best"}
        if which not in folders or not folders[which].is_dir():
            allowed = [name for name, folder in folders.items() if folder.is_dir()]
            raise ConfigError(f"which = {which!r} is not allowed: this run saved "
                              + " and ".join(repr(a) for a in allowed))
        return load_predictor(folders[which])

    def __repr__(self) -> str:
        if not (self.run_dir / "summary.json").is_file():
            return f"RunResult({str(self.run_dir)!r}, unfinished)"
        summary = self.summary
        return (f"RunResult({str(self.run_dir)!r}, {summary['rounds_completed']} rounds, final "
                f"accuracy {summary['final']['eval_accuracy']:.4f})")


def _frame(path: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(path)


def load_run(run_dir: str | Path) -> RunResult:
    """The results of a run made earlier (by ``fedtune run``, ``fedtune.run``, a sweep)."""
    path = Path(run_dir)
    if not (path / "config.toml").is_file():
        raise ConfigError(f"run_dir = {str(run_dir)!r} is not allowed: must be a run directory "
                          "(it has no config.toml)")
    return RunResult(path)


def _reporter(progress: bool, callbacks: Sequence[Callback] = ()) -> Any:
    from rich.console import Console

    from fedtune.terminal import NORMAL, QUIET, RichReporter

    # plain lines, bound to this stdout (a notebook's too): the log capture takes sys.stdout
    # while the run lasts
    console = Console(file=sys.stdout, soft_wrap=True, color_system=None, highlight=False,
                      force_jupyter=False, force_terminal=False)
    return RichReporter(console, NORMAL if progress else QUIET, callbacks)


def run(config: ConfigLike = None, overrides: Overrides = None, output: str | Path | None = None,
        *, progress: bool = True, verbose: bool = False,
        callbacks: Sequence[Callback] = ()) -> RunResult:
    """Run one federated experiment (``fedtune run``); returns its results.

    ``config``: a TOML file, a ``Config`` or a dict of sections (None: the defaults, the
    quickstart); ``overrides``: ``{"section.key": value}`` or ``["section.key=value"]``;
    ``output``: the run directory (new or empty; default ``<run.output_dir>/<name>-<time>``);
    ``callbacks``: ``fedtune.Callback`` objects called as rounds end, which may stop the run
    (``fedtune.EarlyStopping``; see ``fedtune.server.callbacks``).
    """
    resolved = resolve_config(config, overrides)
    path = Path(output or resolved.run.dir or default_run_path(resolved))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output = {str(path)!r} is not allowed: must be a new or empty "
                          "directory, not a file")
    if not is_empty_run_dir(path):
        raise ConfigError(f"output = {str(path)!r} is not allowed: must be a new or empty "
                          "directory")
    check_creatable(path, "output =")
    callbacks = list(callbacks)
    if not all(isinstance(c, Callback) for c in callbacks):
        raise ConfigError(f"callbacks = {callbacks!r} is not allowed: must be a list of "
                          "fedtune.Callback objects")
    if callbacks and not RUNTIMES[resolved.engine.backend].federated:
        raise ConfigError(f"callbacks are not allowed with engine.backend = "
                          f"{resolved.engine.backend!r}: the centralized reference has no "
                          "round loop of the server")
    resolved.run.dir = str(path)
    reporter = _reporter(progress, callbacks)
    reporter.stage("loading torch, transformers and Flower")
    try:
        with capture_run_log(path, echo=verbose):
            quiet_libraries()
            from fedtune.engine.launch import launch

            launch(resolved, reporter)
    finally:
        reporter.close()
    return RunResult(path)


@dataclass(frozen=True)
class SweepResult:
    """A sweep directory, read as data."""

    directory: Path

    @property
    def results(self) -> pd.DataFrame:
        """results.csv: one row per run (grid values, final metrics, run directory)."""
        return _frame(self.directory / "results.csv")

    @property
    def table(self) -> pd.DataFrame:
        """table.csv: mean ± std of the sweep's metric over seeds, per other grid values."""
        return _frame(self.directory / "table.csv")

    @property
    def runs(self) -> list[RunResult]:
        """Every run of the sweep, in results.csv's order."""
        return [RunResult(Path(path)) for path in self.results["run_dir"]]

    @property
    def plots(self) -> dict[str, Path]:
        return {path.stem: path for path in sorted(self.directory.glob("*.png"))}


def sweep(path: str | Path, overrides: Overrides = None,
          grid: Mapping[str, Any] | Iterable[str] | None = None,
          output: str | Path | None = None, *, progress: bool = True,
          verbose: bool = False, other_code: str = "refuse") -> SweepResult:
    """Run a grid of experiments (``fedtune sweep``): every unfinished point of the sweep file
    ``path``, one line per run; returns the sweep's results. ``overrides`` change the base
    config; ``grid`` runs only some values of grid keys (``{"run.seed": [0]}``, as ``--grid``);
    ``other_code``: what to do with a finished point made by other code, "refuse" (a
    ConfigError), "rerun" or "reuse" (``--other-code``).
    """
    from fedtune.studies.sweep import load_sweep, run_sweep
    from fedtune.studies.tables import write_outputs

    selection = override_texts(grid)
    spec = load_sweep(path, override_texts(overrides), selection)
    if output:
        spec.output_dir, spec.name = str(Path(output).parent), Path(output).name

    def run_one(config: Config) -> None:
        with capture_run_log(Path(config.run.dir), echo=verbose):
            quiet_libraries()
            from fedtune.engine.launch import launch

            launch(config)

    def on_run(index: int, total: int, point: Any, status: str) -> None:
        if progress:
            final = RunResult(Path(point.config.run.dir)).summary["final"].get(spec.metric)
            values = " ".join(f"{k}={v}" for k, v in point.values.items())
            shown = "-" if final is None else f"{final:.4f}"
            print(f"[{index}/{total}] {values}: {spec.metric} {shown} ({status})", flush=True)

    write_outputs(spec, run_sweep(spec, run_one, on_run, other_code=other_code))
    return SweepResult(spec.directory)
