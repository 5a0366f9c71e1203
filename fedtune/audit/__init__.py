"""Empirical privacy audits of a run (``privacy.audit = true``, ``fedtune audit RUN_DIR``).

- ``estimators.py``: the statistics, pure math: ε of two Gaussians fitted to canary cosines
  (Andrew et al. 2024, one-shot estimation) and the one-run lower bound of Steinke, Nasr and
  Jagielski (2023).
- ``canary_examples.py``: sample-level canaries (local DP, no privacy): random examples with
  random labels, half of them added to random clients' training data.
- ``report.py``: runs the audit that fits the run's privacy mode (user-level canary clients
  of ``strategies.dp_fedavg`` for central DP, canary examples otherwise), writes
  ``audit.json`` and ``plots/audit.png`` and says loudly when an empirical ε exceeds the
  accountant's.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import Config, ConfigError, load_config


def audited_config(path: str | Path) -> Config:
    """The config of the finished run in ``path``, which must have run with ``privacy.audit``
    (checked from its files alone: no torch, so a wrong directory is told at once)."""
    folder = Path(path)
    if not (folder / "config.toml").is_file() or not (folder / "summary.json").is_file():
        raise ConfigError(f"{str(path)!r} is not a finished run directory: it needs "
                          "config.toml, summary.json and model/")
    config = load_config(folder / "config.toml")
    if not config.privacy.audit:
        raise ConfigError(f"{str(path)!r} ran with privacy.audit = false: it inserted no "
                          "canaries; rerun it with --set privacy.audit=true")
    return config
