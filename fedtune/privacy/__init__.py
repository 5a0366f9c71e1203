"""Differential privacy: the modes a run can use (``privacy.mode``) and what they share.

- ``none.py``: no privacy mechanism.
- ``local.py``: sample-level DP on every client, DP-SGD (Abadi et al. 2016) with Opacus (the
  Opacus side is ``dp_sgd.py``). ε is per client and accumulates over every round it trains.
- ``central_dp.py``: user-level DP-FedAvg at the server (McMahan et al. 2018), with adaptive
  clipping (Andrew et al. 2021); the mechanism is ``strategies.dp_fedavg``. ε is the run's.
- ``accounting.py``: ε of Poisson-subsampled Gaussian mechanisms (opacus.accountants).

A mode is an object (``mode.PrivacyMode``) that owns the plan fixed before the run starts (σ),
how it wraps the strategy, how a client trains under it, and the server's per-round state (its
stop rule, its metrics.csv columns, its checkpointed accountant, its part of summary.json). Its
config keys and checks are its entry in ``fedtune.tables.privacy_modes``.
"""
