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
