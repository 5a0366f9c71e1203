"""Simulated devices: each client's compute speed, bandwidth and availability (``profiles``,
FedScale traces in ``trace``), and the virtual clock that times their work (``clock``)."""
