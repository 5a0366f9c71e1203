"""SecAgg+'s per-round overhead against plain FedAvg, at 10, 100 and 1,000 clients.

One train round of every client, both sides in this process over fedtune's in-process Grid,
alternating A B A B (plain, secure, plain, secure) per setting; medians of wall time and of
CPU seconds (``time.process_time``: this process and its threads, so the clients' key set-up
and masking and the server's unmasking all count - the in-process Grid runs every client
here). The clients' training is a stand-in (the global model plus a fixed random update per
client), the same on both sides, so the difference is the protocol: key agreement, Shamir
shares, sealing and opening them, quantising, the masks (AES-CTR), and on the server the
reconstruction of every survivor's self-mask seed and the removal of its mask. The models are
fedtune's default MLP (4,096 hashed features, a hidden layer of 128: 524,674 travelling
values) and MiniLM with LoRA (rank 8 on query and value, and the head: 74,498). No client
drops out, so no pairwise mask is recomputed on the server.

Run: ``flock /tmp/fedtune-heavy.lock python benchmarks/secagg_overhead.py`` (all settings), or
``--clients 10,100 --models lora --degree 16 --repeats 2``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np

EXAMPLES_PER_CLIENT = 10


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    server_s: float  # SecAgg+: the server's own protocol CPU seconds
    bytes_up: int
    bytes_down: int


def _model_arrays(model: str) -> dict[str, np.ndarray]:
    """The travelling tensors of the benchmark's model, as fedtune builds it."""
    from fedtune.config import load_config
    from fedtune.models.build import ModelSpec, build_model, model_spec
    from fedtune.models.transfer import TransferSpec
    from fedtune.models.weights import shared_state

    if model == "mlp":
        config = load_config(None, ["model.kind=mlp"])
        spec = ModelSpec(kind="mlp", num_labels=2, label_names=("neg", "pos"),
                         input_dim=config.model.num_features,
                         hidden_sizes=tuple(config.model.hidden_sizes),
                         num_features=config.model.num_features,
                         transfer=TransferSpec(mode="full"))
    else:
        config = load_config(None, ["model.kind=hf", "model.transfer=lora"])
        spec = model_spec(config, ("neg", "pos"), None)
    return shared_state(build_model(spec, 0))


def _stand_in_app(shapes: dict[str, tuple[int, ...]]):
    """fedtune's SecAgg+ client side around a training that adds a fixed update."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedtune import protocol
    from fedtune.client.secagg_stages import secagg_stage, secagg_train_mod

    app = ClientApp()
    app.query(protocol.SECAGG_ACTION)(secagg_stage)

    @app.train(mods=[secagg_train_mod])
    def train(msg: Message, context) -> Message:
        client = int(context.node_config[protocol.PARTITION_ID])
        rng = np.random.default_rng(client)
        sent = protocol.to_numpy(msg.content[protocol.ARRAYS])
        updated = {name: value + rng.standard_normal(shapes[name], np.float32) * 0.01
                   for name, value in sent.items()}
        return Message(RecordDict({
            protocol.ARRAYS: protocol.to_array_record(updated),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: EXAMPLES_PER_CLIENT,
                                            protocol.PARTITION_ID: client})}), reply_to=msg)

    return app


def one_round(arrays: dict[str, np.ndarray], clients: int, secure: bool, degree: int,
              bits: int) -> Sample:
    from flwr.app import ConfigRecord

    from fedtune import protocol
    from fedtune.config import load_config, to_run_config
    from fedtune.engine.inprocess import InProcessGrid
    from fedtune.privacy.mode import PrivacyPlan
    from fedtune.server.build_strategy import build_strategy
    from fedtune.server.exchange import exchange
    from fedtune.server.round import by_client
    from fedtune.server.screening import screen_train_replies

    config = load_config(None, [
        "model.kind=mlp", f"data.num_clients={clients}", "strategy.fraction_train=1.0",
        "strategy.fraction_evaluate=0", f"strategy.secure_aggregation={str(secure).lower()}",
        f"strategy.secagg_degree={degree}", f"strategy.secagg_bits={bits}"])
    app = _stand_in_app({name: value.shape for name, value in arrays.items()})
    grid = InProcessGrid(app, to_run_config(config), clients)
    strategy = build_strategy(config, PrivacyPlan(), clients * EXAMPLES_PER_CLIENT)
    record = protocol.to_array_record(arrays)
    wall, cpu = time.perf_counter(), time.process_time()
    train = exchange(grid, strategy.configure_train(1, record, ConfigRecord(), grid), 3600)
    accepted = screen_train_replies(train, 10**9, {}, False).accepted
    new, _ = strategy.aggregate_train(1, by_client(accepted))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert new is not None and len(accepted) == clients
    report = strategy.finish_round() if secure else None
    return Sample(wall, cpu, report.server_s if report else 0.0,
                  train.bytes_up + (report.bytes_up if report else 0),
                  train.bytes_down + (report.bytes_down if report else 0))


def _median(samples: list[Sample], field: str) -> float:
    return statistics.median(getattr(s, field) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--models", default="mlp,lora")
    parser.add_argument("--degree", type=int, default=16, help="strategy.secagg_degree")
    parser.add_argument("--complete-up-to", type=int, default=100,
                        help="also run the complete graph (degree 0) up to this many clients")
    parser.add_argument("--bits", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs per setting")
    args = parser.parse_args()
    from fedtune.secagg.graph import effective_degree

    print(f"{'model':5} {'values':>7} {'clients':>7} {'k':>4} | {'plain s':>8} {'CPU s':>7} | "
          f"{'secure s':>8} {'CPU s':>7} {'server':>7} | {'+CPU s':>7} {'+CPU ms/client':>14} "
          f"{'x CPU':>6} | {'up kB/client':>12} {'down kB/client':>14}", flush=True)
    for model in args.models.split(","):
        arrays = _model_arrays(model)
        values = sum(a.size for a in arrays.values())
        for clients in (int(c) for c in args.clients.split(",")):
            degrees = [args.degree] + ([0] if clients <= args.complete_up_to else [])
            settings = {effective_degree(d, clients): d for d in degrees}  # k -> configured
            for degree, configured in settings.items():
                plain, secure = [], []
                for _ in range(args.repeats):
                    plain.append(one_round(arrays, clients, False, 0, args.bits))
                    secure.append(one_round(arrays, clients, True, configured, args.bits))
                extra = _median(secure, "cpu_s") - _median(plain, "cpu_s")
                print(f"{model:5} {values:>7,} {clients:>7,} {degree:>4} | "
                      f"{_median(plain, 'wall_s'):>8.2f} {_median(plain, 'cpu_s'):>7.2f} | "
                      f"{_median(secure, 'wall_s'):>8.2f} {_median(secure, 'cpu_s'):>7.2f} "
                      f"{_median(secure, 'server_s'):>7.2f} | {extra:>7.2f} "
                      f"{1000 * extra / clients:>14.1f} "
                      f"{_median(secure, 'cpu_s') / _median(plain, 'cpu_s'):>6.2f} | "
                      f"{_median(secure, 'bytes_up') / clients / 1e3:>5.0f} "
                      f"({_median(plain, 'bytes_up') / clients / 1e3:>4.0f}) "
                      f"{_median(secure, 'bytes_down') / clients / 1e3:>7.0f} "
                      f"({_median(plain, 'bytes_down') / clients / 1e3:>4.0f})", flush=True)


if __name__ == "__main__":
    main()
