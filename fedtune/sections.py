"""The config sections built from the extension tables: ``[model]`` from the model kinds,
``[strategy]`` from the strategies, ``[privacy]`` from the privacy modes, ``[engine]`` from
the runtimes, ``[devices]`` from the device profiles and ``[attack]`` from the attacks
(``fedtune.tables.section_class``: a few common keys, then every key the table's entries own).

The classes are made at import time, so a type checker cannot see their fields:
``fedtune/sections.pyi`` declares them, generated from the tables by
``scripts/sync_config_stubs.py`` (a test fails while it is stale), so that
``config.strategy.proximal_mu`` is known to be a float. ``fedtune.config`` puts them into
``Config`` beside the fixed sections.
"""

from __future__ import annotations

from fedtune.tables import Key, UsedWith, section_class
from fedtune.tables.attacks import ATTACKS
from fedtune.tables.devices import DEVICE_PROFILES
from fedtune.tables.model_kinds import MODEL_KINDS, TRANSFER_MODES
from fedtune.tables.privacy_modes import PRIVACY_MODES
from fedtune.tables.runtimes import RUNTIMES
from fedtune.tables.strategies import STRATEGIES

__all__ = ["CHOOSERS", "DERIVED_SECTIONS", "AttackSection", "DevicesSection", "EngineSection",
           "ModelSection", "PrivacySection", "StrategySection"]

ModelSection = section_class(
    "ModelSection", "[model]: the model kind (fedtune.tables.model_kinds) and how it trains.",
    {"kind": Key("hf", "hf = Hugging Face sequence classifier, mlp = multilayer perceptron",
                 choices=tuple(MODEL_KINDS)),
     "transfer": Key("full", "what trains (and travels): scratch = random init, all; full = "
                             "pretrained, all; frozen = head only; top_k = last top_k_layers "
                             "encoder layers + head; lora = LoRA adapters + head",
                     choices=TRANSFER_MODES),
     "dropout": Key(0.1, "dropout before the classifier head", ge=0, lt=1)},
    MODEL_KINDS, "kind")

StrategySection = section_class(
    "StrategySection", "[strategy]: the aggregation (fedtune.tables.strategies) and sampling. "
                       "Hyper-parameters apply to the strategies named in their help and are "
                       "ignored by the others, so one sweep file can set them all.",
    {"name": Key("fedavg", "aggregation strategy", choices=tuple(STRATEGIES)),
     "fraction_train": Key(0.25, "fraction of clients sampled for training each round", gt=0,
                           le=1),
     "fraction_evaluate": Key(0.25, "fraction of clients sampled for federated evaluation; 0 "
                                    "= none", ge=0, le=1),
     "min_train_clients": Key(1, "fewest clients sampled for training each round (Flower's "
                                 "min_train_nodes)", ge=1),
     "round_timeout_s": Key(3600.0, "longest wait for the replies of one round", gt=0),
     "max_update_norm": Key(0.0, "clip every client's update (its model minus the global "
                                 "model, L2 norm) to at most this; 0 = off", ge=0),
     "update_norm_z": Key(0.0, "reject an update whose norm lies more than this many robust "
                               "standard deviations (median absolute deviation) above the "
                               "round's median; 0 = off", ge=0),
     "round_deadline_s": Key(0.0, "synchronous rounds with devices: a round ends this many "
                                  "virtual seconds after it starts; later clients are dropped "
                                  "as stragglers; 0 = no deadline", ge=0),
     "over_selection": Key(0.0, "synchronous rounds with devices: sample ceil(K (1 + f)) "
                                "clients and keep the first K to finish (Bonawitz et al. "
                                "2019); 0 = sample K", ge=0, le=10),
     "secure_aggregation": Key(False, "SecAgg+ (Bell et al. 2020): the server sees only the "
                                      "weighted sum of the clients' updates (weighted-sum "
                                      "strategies; with privacy.mode = central: distributed DP)"),
     "secagg_degree": Key(16, "SecAgg+: neighbours k each client masks with and shares its "
                              "secrets with (even); 0 = every other sampled client", ge=0),
     "secagg_threshold": Key(0.6, "SecAgg+: share of a client's k neighbours that must "
                                   "survive to unmask it, and of the cohort whose inputs must "
                                   "arrive", gt=0.5, le=1),
     "secagg_bits": Key(24, "SecAgg+: quantisation bits of each summed value", ge=4, le=30),
     "secagg_clip_range": Key(0.0, "SecAgg+: summed values are clipped to [-c, c] before "
                                   "quantising; 0 = 1, or under central DP clip_norm + 6 noise "
                                   "std", ge=0)},
    STRATEGIES, "name")

PrivacySection = section_class(
    "PrivacySection", "[privacy]: the privacy mode (fedtune.privacy) and its budget.",
    {"mode": Key("none", "differential privacy: local = DP-SGD on every client (per example, "
                         "Opacus), central = DP-FedAvg at the server (per client); in central "
                         "mode each client is sampled with probability strategy.fraction_train",
                 choices=tuple(PRIVACY_MODES))},
    PRIVACY_MODES, "mode")

EngineSection = section_class(
    "EngineSection", "[engine]: the runtime (fedtune.tables.runtimes) and its resources.",
    {"backend": Key("ray", "ray = fedtune's engine (persistent Ray actors), flower = Flower's "
                           "Ray simulation, inprocess = no Ray (debug), central = the "
                           "centralized reference (pooled data, no federation)",
                    choices=tuple(RUNTIMES)),
     "client_cpus": Key(1.0, "CPU cores reserved per simulated client", gt=0),
     "client_gpus": Key(0.0, "GPU fraction per simulated client (0.25 = 4 share one)", ge=0,
                        le=1),
     "node_wait_s": Key(300.0, "how long the server waits for all clients (ray: its actors) to "
                              "start", gt=0),
     "node_ids": Key([], "deployment: the node id of each client, in client order, as `flwr "
                         "supernode register` printed them; only these SuperNodes take part. "
                         "[] = simulations (the runtime knows its clients), or trust the "
                         "partition-id each SuperNode first declares", kind=list[str]),
     # centralized runs to convergence (engine.central_until = "converged", a sweep's
     # centralized rows); any config may carry them, so that a sweep's base sets them
     "central_patience": Key(5, "centralized runs to convergence: stop after this many "
                                "epochs without a lower validation loss", ge=1),
     "central_max_epochs": Key(100, "centralized runs to convergence: the most epochs", ge=1)},
    RUNTIMES, "backend")

# the keys that say who attacks have an effect only while someone does
ATTACKERS = UsedWith("name", tuple(name for name, entry in ATTACKS.items() if entry.attacks))
AttackSection = section_class(
    "AttackSection", "[attack]: a poisoning attack (fedtune.tables.attacks) played by some "
                     "clients, drawn once from run.seed or named.",
    {"name": Key("none", "the attack the attackers play", choices=tuple(ATTACKS)),
     "fraction": Key(0.0, "share of the clients that attack, drawn once from run.seed (the "
                          "same clients every round)", ge=0, le=1),
     "count": Key(0, "how many clients attack, drawn once from run.seed (instead of "
                     "fraction)", ge=0),
     "clients": Key([], "the attacking clients' ids (instead of fraction or count)",
                    kind=list[int], ge=0),
     "start_round": Key(1, "the first round the attackers attack (honest before it)", ge=1),
     "collude": Key(0, "attackers per collusion group (in id order); 0 = all of them collude",
                    ge=0)},
    ATTACKS, "name",
    {name: ATTACKERS for name in ("fraction", "count", "clients", "start_round", "collude")})

# each derived section, and the key of it that picks a table entry
DevicesSection = section_class(
    "DevicesSection", "[devices]: simulated devices (fedtune.tables.devices) and the virtual "
                      "clock that times the clients' work.",
    {"profile": Key("none", "none = every client equally fast and always available; "
                            "lognormal = parametric devices; trace = FedScale's device traces",
                    choices=tuple(DEVICE_PROFILES)),
     "seed": Key(0, "seed of the device draws, beside run.seed", ge=0)},
    DEVICE_PROFILES, "profile")


DERIVED_SECTIONS: dict[str, type] = {"model": ModelSection, "strategy": StrategySection,
                                     "privacy": PrivacySection, "engine": EngineSection,
                                     "attack": AttackSection, "devices": DevicesSection}
CHOOSERS = {"model": "kind", "strategy": "name", "privacy": "mode", "engine": "backend",
            "attack": "name", "devices": "profile"}
