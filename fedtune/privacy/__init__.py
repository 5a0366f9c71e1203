"""Differential privacy: accountants, local DP-SGD with Opacus, central user-level DP-FedAvg.

- ``accounting``: ε of a history of Poisson-subsampled Gaussian steps (opacus.accountants),
  the noise that meets a target, how many steps a budget still allows.
- ``local_dp``: sample-level DP on a client (Abadi et al. 2016) with Opacus' PrivacyEngine.
- ``central``: the server's budget for user-level DP-FedAvg (McMahan et al. 2018); the
  mechanism itself is ``strategies.dp_fedavg``.
"""
