"""What one process needs to run a configured task, built once and kept resident.

A ``TaskResources`` holds the federation (index arrays), the encoded inputs (token ids,
hashed features or pixels), the model spec and one resident model. Server, in-process
clients and every Ray worker call ``task_resources(config)``; the first call per process
loads and encodes, later calls (every round, every virtual client) reuse it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from fedtune.attacks.plan import AttackPlan
from fedtune.attacks.poisoned_data import Poisoning
from fedtune.audit.canary_examples import CanaryExamples, insert_canary_examples
from fedtune.config import Config, ConfigError, RunConfigValue, from_run_config, to_toml
from fedtune.data.encode import Batch, Encoded
from fedtune.data.federation import Federation, build_federation
from fedtune.data.loaders import OrderedBatches, eval_loader, train_loader, train_rows
from fedtune.faults import FaultPlan
from fedtune.models.build import ModelSpec, build_model, model_kind, model_spec
from fedtune.protocol import MAX_ANY_EXAMPLES
from fedtune.tables.privacy_modes import PRIVACY_MODES, privacy_mode
from fedtune.train import TrainSettings, make_optimizer, reset_optimizer

if TYPE_CHECKING:
    from fedtune.privacy.mode import PrivacyMode


def resolve_device(name: str) -> torch.device:
    """``client.device`` as a torch device: auto, cpu, cuda or cuda:N (the N-th GPU this
    process sees; under Ray, the N-th of those Ray gave the client)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= visible:
            if visible:
                raise ConfigError(f"client.device = {name!r} is not allowed here: {visible} CUDA "
                                  f"device(s) visible; must be 'auto', 'cpu', 'cuda' or "
                                  f"'cuda:0' to 'cuda:{visible - 1}'")
            raise ConfigError(f"client.device = {name!r} is not allowed here: no CUDA device is "
                              "visible; must be 'auto' or 'cpu'")
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast needs CUDA (on CPU only bf16 is supported)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"client.precision = 'fp16' is not allowed on {device.type}: no CUDA "
                          "device is visible; must be 'fp32' or 'bf16'")


def client_round_seed(run_seed: int, server_round: int, client_id: int,
                      dispatch: int | None = None) -> int:
    """Seed for one client's work in one round (batch order, dropout); ``dispatch``: an
    asynchronous server's training call (``fedtune.protocol.DISPATCH``), where a client may
    finish and start again on the same model within one server update and must not train on
    the same batches twice."""
    words = [run_seed, server_round, client_id] + ([] if dispatch is None else [dispatch])
    return int(np.random.SeedSequence(words).generate_state(1)[0])


# NumPy's SeedSequence (O'Neill's seed_seq; numpy/random/bit_generator.pyx): its constants,
# for ``client_round_seeds``, which derives a block's seeds at once with the same values
_POOL_SIZE, _XSHIFT, _MASK = 4, 16, 0xFFFFFFFF
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715


def _words(value: int) -> list[int]:
    """An entropy integer as SeedSequence's little-endian 32-bit words (0 is one word)."""
    words = [value & _MASK]
    while value := value >> 32:
        words.append(value & _MASK)
    return words


def _hashmix(words: np.ndarray, consts: list[int]) -> np.ndarray:
    """SeedSequence's hashmix of row i of ``words`` with the constants ``consts[i]`` (xor) and
    ``consts[i + 1]`` (multiply), each row as the i-th of consecutive calls."""
    rows = len(consts) - 1
    value = words ^ np.array(consts[:rows], np.uint32)[:, None]
    value = value * np.array(consts[1:], np.uint32)[:, None]
    return value ^ (value >> np.uint32(_XSHIFT))


def client_round_seeds(run_seed: int, server_round: int, client_ids: Sequence[int],
                       dispatch: int | None = None) -> list[int]:
    """``client_round_seed`` of each client of ``client_ids``, derived for the block at once.

    SeedSequence([run_seed, server_round, client_id(, dispatch)]).generate_state(1) costs
    ~10-20 µs of Python per client; its arithmetic (hash and mix of 32-bit words, every
    constant sequence independent of the data) runs here over all clients as NumPy uint32
    vectors. NumPy has no batched SeedSequence, hence this; tests/client/test_round_seeds.py
    checks it against SeedSequence. Ids of 2**32 or more, or entropy longer than the pool
    (four words: an asynchronous server's ``dispatch`` fits beside a run seed and a round
    below 2**32), go through SeedSequence itself."""
    ids = np.asarray(client_ids, dtype=np.int64)
    words = [run_seed, server_round] + ([] if dispatch is None else [dispatch])
    if min(words) < 0:  # SeedSequence says what it allows
        return [client_round_seed(run_seed, server_round, int(i), dispatch) for i in ids]
    head = [*_words(run_seed), *_words(server_round)]
    tail = [] if dispatch is None else _words(dispatch)  # after the client's id
    if (len(head) + 1 + len(tail) > _POOL_SIZE or len(ids) == 0 or ids.min() < 0
            or ids.max() > _MASK):
        return [client_round_seed(run_seed, server_round, int(i), dispatch) for i in ids]
    # every hashmix call takes the next constant of one sequence: word ^ c[k], then * c[k + 1]
    consts = [_INIT_A]
    for _ in range(_POOL_SIZE * _POOL_SIZE):
        consts.append((consts[-1] * _MULT_A) & _MASK)
    with np.errstate(over="ignore"):
        pool = np.zeros((_POOL_SIZE, len(ids)), np.uint32)
        pool[:len(head)] = np.array(head, np.uint32)[:, None]
        pool[len(head)] = ids.astype(np.uint32)
        pool[len(head) + 1:len(head) + 1 + len(tail)] = np.array(tail, np.uint32)[:, None]
        pool = _hashmix(pool, consts[:_POOL_SIZE + 1])
        used = _POOL_SIZE
        for source in range(_POOL_SIZE):
            # a source's word is hashed for each other word in turn; it does not change
            # meanwhile, so the three hashes and mixes run as one (rows: the targets in order)
            targets = [t for t in range(_POOL_SIZE) if t != source]
            hashed = _hashmix(pool[source][None, :], consts[used:used + len(targets) + 1])
            used += len(targets)
            mixed = np.uint32(_MIX_MULT_L) * pool[targets] - np.uint32(_MIX_MULT_R) * hashed
            pool[targets] = mixed ^ (mixed >> np.uint32(_XSHIFT))
        # generate_state(1): the first pool word, hashed with INIT_B
        value = pool[0] ^ np.uint32(_INIT_B)
        value = value * np.uint32((_INIT_B * _MULT_B) & _MASK)
        value = value ^ (value >> np.uint32(_XSHIFT))
    return value.astype(np.int64).tolist()


@lru_cache(maxsize=1)
def _has_cuda() -> bool:
    return torch.cuda.is_available()


def seed_torch(seed: int) -> None:
    """``torch.manual_seed``, minus its lazy seeding of absent CUDA/XPU/MTIA devices, which
    formats a Python stack per call and costs more than a small client's training step."""
    if _has_cuda():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def train_settings(config: Config) -> TrainSettings:
    c = config.client
    return TrainSettings(optimizer=c.optimizer, lr=c.lr, weight_decay=c.weight_decay,
                         momentum=c.momentum, local_epochs=c.local_epochs,
                         local_steps=c.local_steps, max_grad_norm=c.max_grad_norm,
                         precision=c.precision)


@dataclass
class TaskResources:
    config: Config
    federation: Federation
    encoded: Encoded
    spec: ModelSpec
    device: torch.device
    canaries: CanaryExamples | None = None  # privacy.audit's canary examples, if any
    poisoning: Poisoning | None = None  # a data attack's poisoned examples, if any
    _poisoned_shard: int | None = field(default=None, repr=False)  # trains on poisoned rows
    _model: nn.Module | None = field(default=None, repr=False)
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    # whether its training clients are trained together (``fedtune.client.vectorised.
    # vectorisable``), decided on first use: the config and the resident model stay
    together: bool | None = field(default=None, repr=False)

    @cached_property
    def train_settings(self) -> TrainSettings:
        return train_settings(self.config)

    @cached_property
    def privacy(self) -> PrivacyMode:
        """The privacy mode clients train under."""
        return privacy_mode(self.config)

    @cached_property
    def faults(self) -> FaultPlan:
        """Which clients misbehave, and how ([faults])."""
        return FaultPlan.from_config(self.config)

    @cached_property
    def attack(self) -> AttackPlan:
        """Who attacks, and how ([attack])."""
        return AttackPlan.from_config(self.config)

    @contextmanager
    def poisoned(self, shard: int) -> Iterator[None]:
        """Within this block, ``shard`` trains on its data attack's poisoned rows."""
        self._poisoned_shard = shard
        try:
            yield
        finally:
            self._poisoned_shard = None

    def client_train_rows(self, shard: int) -> np.ndarray:
        """The rows ``shard`` trains on: its training split, or its poisoned rows while it
        attacks (``poisoned``)."""
        if self.poisoning is not None and shard == self._poisoned_shard:
            return self.poisoning.train_rows[shard]
        return self.federation.client_train_rows[shard]

    def triggered_test_loader(self) -> OrderedBatches | None:
        """A backdoor's triggered global test examples of other labels, labelled with its
        target (None without a backdoor)."""
        if self.poisoning is None or self.poisoning.triggered_test_rows is None:
            return None
        return eval_loader(self.encoded, self.federation.data.labels,
                           self.poisoning.triggered_test_rows, self.config.client.eval_batch_size)

    @property
    def model(self) -> nn.Module:
        """The resident model (built on first use, then reused with new weights each call)."""
        if self._model is None:
            self._model = build_model(self.spec, self.config.run.seed).to(self.device)
        return self._model

    def local_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over the resident model's trainable parameters, reset: one
        optimizer serves every client this process trains (``fedtune.train.reset_optimizer``)."""
        if self._optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._optimizer = make_optimizer(params, self.train_settings)
        return reset_optimizer(self._optimizer)

    def client_train_loader(self, shard: int, seed: int) -> Iterable[Batch]:
        rows = self.client_train_rows(shard)
        return train_loader(self.encoded, self.federation.data.labels, rows,
                            self.config.client.batch_size, seed)

    def client_train_row_batches(self, shard: int, seed: int) -> Iterable[np.ndarray]:
        """The row numbers of ``client_train_loader``'s batches (the same draws), epoch by
        epoch: clients trained together gather a chunk's batches at once."""
        return train_rows(self.encoded, self.client_train_rows(shard),
                          self.config.client.batch_size, seed)

    def client_test_loader(self, shard: int) -> OrderedBatches:
        return eval_loader(self.encoded, self.federation.data.labels,
                           self.federation.client_test_rows[shard],
                           self.config.client.eval_batch_size)

    def client_val_loader(self, shard: int) -> OrderedBatches | None:
        """The client's local validation split (``data.local_val_fraction``), None without."""
        rows = self.federation.client_val_rows
        if not rows or not len(rows[shard]):
            return None
        return eval_loader(self.encoded, self.federation.data.labels, rows[shard],
                           self.config.client.eval_batch_size)

    def max_train_examples(self) -> int:
        """The most examples a training reply may claim: the federation's training rows
        (unknown, so any count, for private per-party files)."""
        return int(self.federation.train_sizes.sum()) or MAX_ANY_EXAMPLES

    def max_test_examples(self) -> int:
        """The most examples an evaluation reply may claim (any count for private files)."""
        return int(self.federation.test_sizes.sum()) or MAX_ANY_EXAMPLES

    def global_test_loader(self) -> OrderedBatches:
        return eval_loader(self.encoded, self.federation.data.labels, self.federation.test_rows,
                           self.config.client.eval_batch_size)


_RESIDENT: dict[str, TaskResources] = {}
_MAX_RESIDENT = 2


def task_resources(config: Config, data_path: str = "") -> TaskResources:
    """The process-wide resources for this config (keyed by the resolved config text).

    ``data_path``: a SuperNode's own data file (``data.dataset = "files"``).
    """
    return _resident(to_toml(config), config, data_path)


def run_config_resources(run_config: Mapping[str, RunConfigValue],
                         data_path: str = "") -> TaskResources:
    """``task_resources`` for a Flower run config, which is parsed once per process: a
    simulated client calls this for every message, and parsing costs more than a small step."""
    key, config = _parse_run_config(tuple(sorted(run_config.items())))
    return _resident(key, config, data_path)


def parsed_run_config(run_config: Mapping[str, RunConfigValue]) -> Config:
    """The Config of a Flower run config, parsed once per process."""
    return _parse_run_config(tuple(sorted(run_config.items())))[1]


@lru_cache(maxsize=_MAX_RESIDENT)
def _parse_run_config(items: tuple[tuple[str, RunConfigValue], ...]) -> tuple[str, Config]:
    config = from_run_config(dict(items))
    return to_toml(config), config


def _resident(config_key: str, config: Config, data_path: str) -> TaskResources:
    key = config_key + "\0" + data_path
    if key not in _RESIDENT:
        while len(_RESIDENT) >= _MAX_RESIDENT:
            _RESIDENT.pop(next(iter(_RESIDENT)))
        _RESIDENT[key] = _build_resources(config, data_path)
    return _RESIDENT[key]


def _build_resources(config: Config, data_path: str) -> TaskResources:
    federation = build_federation(config.data, config.run.seed, data_path)
    privacy_mode(config).check_data(config, federation.train_sizes.tolist())
    encoded = model_kind(config.model.kind).encode(config, federation.data)
    canaries = None
    if config.privacy.audit and PRIVACY_MODES[config.privacy.mode].audit_inserts == "examples":
        federation, encoded, canaries = insert_canary_examples(
            federation, encoded, config.privacy.audit_examples, config.run.seed)
    poisoning = None
    plan = AttackPlan.from_config(config)
    if plan.active and plan.entry.acts_on == "data":
        kind = model_kind(config.model.kind)
        poisoning = plan.entry.load()(plan, federation, encoded,
                                      lambda data: kind.encode(config, data), config.run.seed)
        federation, encoded = poisoning.federation, poisoning.encoded
    spec = model_spec(config, federation.data.label_names, encoded)
    device = resolve_device(config.client.device)
    check_precision(config.client.precision, device)
    return TaskResources(config, federation, encoded, spec, device, canaries, poisoning)


# what OpenMP, MKL and NumPy's OpenBLAS read when a process loads them
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def limit_threads(cpus: float) -> None:
    """Match torch's thread pools to the CPU share a simulated client was given (and the
    environment that processes started from here read: OpenMP, MKL and OpenBLAS read it once,
    when a process loads them, so for this process only ``torch.set_num_threads`` counts)."""
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


@contextmanager
def process_threads(cpus: float) -> Iterator[None]:
    """A runtime's driver computes with a simulated client's threads for its whole life (the
    server's evaluation, clients run in the driver) and hands its child processes (Ray's
    workers inherit the environment of ``ray.init``) the same; the caller's torch threads and
    environment come back afterwards. A torch left at its default of a thread per core spins a
    second OpenMP thread against the clients' processes on a busy machine (BENCHMARKS.md)."""
    threads, environment = torch.get_num_threads(), {n: os.environ.get(n) for n in THREAD_ENV}
    limit_threads(cpus)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
