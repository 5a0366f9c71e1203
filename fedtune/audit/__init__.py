"""Empirical privacy audits of a run (``privacy.audit = true``, ``fedtune audit RUN_DIR``).

- ``estimators.py``: the statistics, pure math: ε of two Gaussians fitted to canary cosines
  (Andrew et al. 2024, one-shot estimation) and the one-run lower bound of Steinke, Nasr and
  Jagielski (2023).
- ``canary_examples.py``: sample-level canaries (local DP, no privacy): random examples with
  random labels, half of them added to random clients' training data.
- ``report.py``: runs the audit that fits the run's privacy mode (user-level canary clients
  of ``strategies.dp_fedavg`` or ``strategies.dp_fedbuff`` for central DP, canary examples
  otherwise), writes
  ``audit.json`` and ``plots/audit.png`` and says loudly when an empirical ε exceeds the
  accountant's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def audit_line(audit: dict[str, Any]) -> str:
    """The audit in one line: the estimate (central DP) beside what it reads for a mechanism
    at the accountant's ε, and the lower bound with the verdict."""
    if "epsilon_lower_bound" not in audit:  # written before the audit kept a bound apart
        return (f"empirical ε {audit['empirical_epsilon']:.3g} (an older audit.json: "
                "`fedtune audit RUN_DIR` redoes it)")
    parts = []
    if audit.get("empirical_is") == "estimate":
        low, high = audit["interval"]
        text = (f"estimate ε {audit['empirical_epsilon']:.3g} (interval {low:.3g} to "
                f"{high:.3g}")
        reference = audit.get("estimate_reference")
        if reference:
            text += (f"; at ε {reference['epsilon']:.3g} it reads {reference['low']:.3g} to "
                     f"{reference['high']:.3g} with {reference['inserted']} inserted canaries")
        parts.append(text + ")" + (" HIGH (not a proof)" if audit.get("estimate_high")
                                   else ""))
    verdict = ("VIOLATION: above the accountant's" if audit["violation"]
               else "no violation")
    parts.append(f"lower bound ε {audit['epsilon_lower_bound']:.3g} ({verdict})")
    return ", ".join(parts)

