"""Custom Flower strategies, one per file; they depend on flwr and numpy only, never on fedtune.

Each is a ``flwr.serverapp.strategy.Strategy`` (a FedAvg subclass for sampling and evaluation),
usable by any Flower ServerApp; the module docstrings give the paper and the message protocol
a ClientApp must follow.
"""

from strategies.fedasync import FedAsync
from strategies.fedbuff import FedBuff
from strategies.feddyn import FedDyn
from strategies.fednova import FedNova
from strategies.rfa import RFA
from strategies.scaffold import Scaffold

__all__ = ["RFA", "FedAsync", "FedBuff", "FedDyn", "FedNova", "Scaffold"]
