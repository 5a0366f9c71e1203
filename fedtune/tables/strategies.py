"""Every aggregation strategy fedtune offers, one entry each (``strategy.name``).

An entry names the server-side Flower ``Strategy`` class (Flower's own, or one of
``strategies/``, which depend on flwr and numpy only), the ``[strategy]`` keys it owns, how
its constructor arguments come from the config, the client side it needs
(``fedtune.client.algorithms``), the reply records that answer a record it sent and the reply
metrics it adds (``fedtune.protocol`` builds the exact reply schema from them), and its
traits. Everything else is derived from this table: the allowed ``strategy.name`` values and
the ``[strategy]`` keys (``fedtune config``), the config checks, building the strategy
(``fedtune.server.build_strategy``), reply screening, and the client's local objective.

Adding a strategy: write its class (``strategies/<name>.py``; its client side, if any, in
``fedtune/client/algorithms.py``) and add one entry here. ``docs/architecture.md`` has the
recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError
from fedtune.tables import Entry, Key, ReplyMetric, import_object

if TYPE_CHECKING:
    from fedtune.config import Config


def _no_arguments(config: Config) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class StrategyEntry(Entry):
    """One strategy: ``implementation`` is its ``Strategy`` class ("module:Class")."""

    arguments: Callable[[Config], dict[str, Any]] = _no_arguments  # constructor arguments
    # constructor arguments that are objects built when the server starts (an inner strategy,
    # the server's own trainer); summary.json describes a strategy by ``arguments`` only
    components: Callable[[Config], dict[str, Any]] = _no_arguments
    client: str = ""  # "module:Class" of its client side; "" = plain local training
    # its client side changes local training only by a LocalObjective (fedtune.client.
    # objective) whose quadratic weight and anchor are the same for every client of a round
    # (its linear and shift terms may come from the client's own state: FedDyn's gradient,
    # SCAFFOLD's control variate; ClientSide.own_state), and its reply comes from the train
    # message, its trained weights, its step count and that state alone; or it trains the
    # whole model plainly from its own values of some tensors, kept in its state and sent back
    # as received (FedPer's head; ClientSide.personal_part): clients may train together
    # (engine.vectorise_clients, fedtune.client.vectorised)
    client_together: bool = False
    answers: Mapping[str, str] = field(default_factory=dict)  # reply record -> sent record
    reply_metrics: Mapping[str, ReplyMetric] = field(default_factory=dict)  # beyond the core
    sgd_only: bool = False  # its update rule assumes plain local SGD steps
    # its aggregate depends on the replies only through FedAvg's example-weighted mean of the
    # models (and of the metrics), so engines may sum the updates where the clients train
    weighted_mean: bool = False
    # SecAgg+ (strategy.secure_aggregation): its aggregate needs only the weighted means of the
    # replies' ArrayRecords, each reply weighted by ``sum_weight``: a reply metric holding an
    # integer ("num-examples"), "1" (unweighted) or "a/b" (a ratio of two metrics)
    sum_weight: str = ""
    needs_updates: str = ""  # why it needs every individual update (then SecAgg+ is refused)
    # "module:function" saying which of a round's updates it left out (fedtune.server.filtering:
    # the screening rates of an attacked run); "" = it weighs every update it is given
    filters: str = ""
    # personalisation: "module:Class" of its ``fedtune.personal`` algorithm ("" = none); what
    # each client keeps to itself (``personal_part``: "head", "model", "" = nothing kept, the
    # personal model is made at evaluation) and what its replies share (``shared_part``)
    personal: str = ""
    personal_part: str = ""
    shared_part: str = ""
    # config values it needs ("section.key" -> value) and why
    requires: Mapping[str, Any] = field(default_factory=dict)
    requires_why: str = ""
    check: Callable[[Config], None] | None = None  # checks involving other keys
    # central DP (``privacy.mode = "central"``) replaces the aggregation by DP-FedAvg and runs
    # this strategy's server optimizer on the noised mean: DP-FedAvg's optimizer arguments
    # (``strategies.dp_fedavg.DPFedAvg``); None = the strategy cannot run under central DP
    dp_server_optimizer: Callable[[Config], dict[str, Any]] | None = None
    # an asynchronous strategy: the server's event loop (fedtune.server.async_loop) feeds it
    # one client update at a time on the virtual clock; a "round" is one server update
    asynchronous: bool = False
    # an asynchronous strategy under central DP: "module:Class" of the strategy that replaces
    # it (clips each update, noises each release: strategies.dp_fedbuff); "" = central DP
    # refuses it
    dp_release: str = ""

    def load_client(self) -> Any:
        """The client-side class this entry names."""
        return import_object(self.client)


def clients_per_round(config: Config) -> int:
    """How many clients Flower's sampling picks for training each round."""
    s = config.strategy
    return max(int(config.data.num_clients * s.fraction_train), s.min_train_clients)


def _check_krum(config: Config) -> None:
    s, sampled = config.strategy, clients_per_round(config)
    if s.num_malicious >= sampled:
        raise ConfigError(
            f"strategy.num_malicious = {s.num_malicious} is not allowed: must be < the "
            f"{sampled} clients sampled per round"
        )


def _check_multikrum(config: Config) -> None:
    _check_krum(config)
    s, sampled = config.strategy, clients_per_round(config)
    if s.multikrum_select > sampled:
        raise ConfigError(
            f"strategy.multikrum_select = {s.multikrum_select} is not allowed: must be <= the "
            f"{sampled} clients sampled per round (0 = {sampled} - num_malicious)"
        )


def _bucketing_inner(config: Config) -> Any:
    """The strategy bucketing wraps, built from its own entry (only its aggregation is used)."""
    entry = STRATEGIES[config.strategy.bucketing_inner]
    return entry.load()(**entry.arguments(config))


def _check_bucketing(config: Config) -> None:
    s = config.strategy
    buckets = -(-clients_per_round(config) // s.bucket_size)
    if s.bucketing_inner in ("krum", "multikrum") and s.num_malicious >= buckets:
        raise ConfigError(
            f"strategy.num_malicious = {s.num_malicious} is not allowed with strategy.name = "
            f"'bucketing': must be < the {buckets} buckets of strategy.bucket_size = "
            f"{s.bucket_size} per round")


def _fednova_a(metrics: Mapping[str, Any], client: Mapping[str, Any]) -> tuple[float, str]:
    """What a FedNova reply's ``fednova-a`` must be: ``||a||_1`` of its ``num-steps`` steps
    with the run's momentum (``strategies.fednova.local_normalizer``, what the client computes)."""
    from strategies.fednova import local_normalizer  # numpy and flwr: only when screening

    steps, momentum = int(metrics["num-steps"]), float(client.get("momentum", 0.0))
    return local_normalizer(steps, momentum), f"{steps} steps with momentum {momentum:g}"


def _fedopt(config: Config) -> dict[str, Any]:
    s = config.strategy
    # eta_l is the clients' learning rate; Flower's FedOpt only stores it
    return {"eta": s.fedopt_eta, "eta_l": config.client.lr, "beta_1": s.fedopt_beta_1,
            "beta_2": s.fedopt_beta_2, "tau": s.fedopt_tau}


def _check_bulyan(config: Config) -> None:
    _check_krum(config)
    s, sampled = config.strategy, clients_per_round(config)
    if sampled < 4 * s.num_malicious + 3:
        raise ConfigError(
            f"strategy.num_malicious = {s.num_malicious} is not allowed with strategy.name = "
            f"'bulyan': the {sampled} clients sampled per round must be at least "
            "4 x num_malicious + 3")


FLOWER = "flwr.serverapp.strategy:"
CLIENTS = "fedtune.client.algorithms:"
FILTERING = "fedtune.server.filtering:"
EXAMPLES = "num-examples"  # fedtune.protocol.NUM_EXAMPLES (tables import no Flower)
KRUM_NEEDS = "it scores every individual update by its distances to the others"
# each Weiszfeld step is a pass over every update; Pillutla et al. (2022) take 3 to 4
MAX_RFA_ITERATIONS = 1000

SERVER_LR = Key(1.0, "server learning rate", gt=0)
CONCURRENCY = Key(10, "asynchronous strategies: clients training at the same time", ge=1)
EVAL_EVERY = Key(1, "asynchronous strategies: evaluate the global model (global test set, "
                    "federated evaluation) after every this many server updates and after the "
                    "last; the server updates between keep their metrics.csv rows, with empty "
                    "evaluation columns (a synchronous round evaluates once per its clients' "
                    "updates: FedBuff with K = n / 10 matches it at 10)", ge=1)
ASYNC_REFUSED = {  # what an asynchronous strategy cannot compose with yet, and why
    "secure_aggregation": "SecAgg+ needs a cohort that starts and ends together, and an "
                          "asynchronous buffer fills one update at a time",
    "round_deadline_s": "an asynchronous server has no rounds to end: slow clients arrive "
                        "stale instead",
    "over_selection": "an asynchronous server starts a client whenever one finishes",
}
FEDOPT_ETA = Key(0.01, "server learning rate eta (Reddi et al. 2021)", gt=0)
FEDOPT_BETA_1 = Key(0.9, "first-moment decay", ge=0, lt=1)
FEDOPT_BETA_2 = Key(0.99, "second-moment decay", ge=0, lt=1)
FEDOPT_TAU = Key(1e-3, "adaptivity tau", gt=0)
NUM_MALICIOUS = Key(0, "assumed Byzantine clients f per round", ge=0)
TRIM_BETA = Key(0.2, "fraction cut from each tail per coordinate", ge=0, lt=0.5)
MULTIKRUM_SELECT = Key(0, "updates Multi-Krum averages; 0 = clients per round - num_malicious",
                       ge=0)
RFA_ITERATIONS = Key(4, "smoothed Weiszfeld steps (Pillutla et al. 2022), from the "
                        "coordinate-wise median", ge=0, le=MAX_RFA_ITERATIONS)
RFA_SMOOTHING = Key(1e-6, "Weiszfeld smoothing nu", gt=0)
# the aggregators bucketing may wrap (stateless: they see only the round's bucket means)
BUCKETING_INNER = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "rfa")
FEDOPT_KEYS = {"fedopt_eta": FEDOPT_ETA, "fedopt_beta_1": FEDOPT_BETA_1,
               "fedopt_beta_2": FEDOPT_BETA_2, "fedopt_tau": FEDOPT_TAU}


def _dp_sgd(config: Config) -> dict[str, Any]:
    """Plain DP-FedAvg: the noised mean is the step (SGD with rate 1, no momentum)."""
    return {"server_optimizer": "sgd", "server_learning_rate": 1.0, "server_momentum": 0.0}


def _dp_momentum(config: Config) -> dict[str, Any]:
    """DP-FedAvgM: SGD with ``strategy.server_lr`` and ``server_momentum`` on the noised mean."""
    s = config.strategy
    return {"server_optimizer": "sgd", "server_learning_rate": s.server_lr,
            "server_momentum": s.server_momentum}


def _dp_adam(config: Config) -> dict[str, Any]:
    """DP-FedAdam: Adam with ``strategy.fedopt_*`` on the noised mean."""
    s = config.strategy
    return {"server_optimizer": "adam", "server_learning_rate": s.fedopt_eta,
            "adam_betas": (s.fedopt_beta_1, s.fedopt_beta_2), "adam_tau": s.fedopt_tau}

STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(
        "FedAvg (McMahan et al. 2017): example-weighted mean of the client models",
        implementation=FLOWER + "FedAvg", weighted_mean=True, sum_weight=EXAMPLES,
        dp_server_optimizer=_dp_sgd),
    "fedprox": StrategyEntry(
        "FedProx (Li et al. 2020): FedAvg with a proximal term in the clients' objective",
        keys={"proximal_mu": Key(0.01, "proximal weight mu (Li et al. 2020 search 0.001-1)",
                                 ge=0)},
        implementation=FLOWER + "FedProx", weighted_mean=True,
        arguments=lambda c: {"proximal_mu": c.strategy.proximal_mu},
        client=CLIENTS + "FedProxClient", client_together=True, sum_weight=EXAMPLES),
    "fedavgm": StrategyEntry(
        "FedAvgM (Hsu et al. 2019): FedAvg with server momentum",
        keys={"server_lr": SERVER_LR,
              "server_momentum": Key(0.9, "server momentum (Hsu et al. 2019)", ge=0, lt=1)},
        implementation=FLOWER + "FedAvgM", weighted_mean=True,
        arguments=lambda c: {"server_learning_rate": c.strategy.server_lr,
                             "server_momentum": c.strategy.server_momentum},
        sum_weight=EXAMPLES, dp_server_optimizer=_dp_momentum),
    "fedadam": StrategyEntry("FedAdam (Reddi et al. 2021): Adam on the server",
                             keys=FEDOPT_KEYS, implementation=FLOWER + "FedAdam",
                             weighted_mean=True, arguments=_fedopt, sum_weight=EXAMPLES,
                             dp_server_optimizer=_dp_adam),
    "fedyogi": StrategyEntry("FedYogi (Reddi et al. 2021): Yogi on the server",
                             keys=FEDOPT_KEYS, implementation=FLOWER + "FedYogi",
                             weighted_mean=True,
                             arguments=_fedopt, sum_weight=EXAMPLES),
    "fedadagrad": StrategyEntry(
        "FedAdagrad (Reddi et al. 2021): Adagrad on the server",
        keys={"fedopt_eta": FEDOPT_ETA, "fedopt_tau": FEDOPT_TAU},
        implementation=FLOWER + "FedAdagrad", weighted_mean=True,
        arguments=lambda c: {"eta": c.strategy.fedopt_eta, "eta_l": c.client.lr,
                             "tau": c.strategy.fedopt_tau},
        sum_weight=EXAMPLES),
    "fedtrimmedavg": StrategyEntry(
        "trimmed mean per coordinate (Yin et al. 2018)",
        keys={"trim_beta": TRIM_BETA},
        implementation=FLOWER + "FedTrimmedAvg",
        arguments=lambda c: {"beta": c.strategy.trim_beta},
        filters=FILTERING + "trimmed_filtered",
        needs_updates="it sorts every coordinate of the individual updates to cut the tails"),
    "fedmedian": StrategyEntry(
        "median per coordinate (Yin et al. 2018)", implementation=FLOWER + "FedMedian",
        needs_updates="it takes the median of every coordinate over the individual updates"),
    "krum": StrategyEntry(
        "Krum (Blanchard et al. 2017): the update closest to its neighbours",
        keys={"num_malicious": NUM_MALICIOUS}, implementation=FLOWER + "Krum",
        arguments=lambda c: {"num_malicious_nodes": c.strategy.num_malicious},
        check=_check_krum, needs_updates=KRUM_NEEDS, filters=FILTERING + "krum_filtered"),
    "multikrum": StrategyEntry(
        "Multi-Krum (Blanchard et al. 2017): the mean of the best Krum scores",
        keys={"num_malicious": NUM_MALICIOUS, "multikrum_select": MULTIKRUM_SELECT},
        implementation=FLOWER + "MultiKrum",
        arguments=lambda c: {
            "num_malicious_nodes": c.strategy.num_malicious,
            "num_nodes_to_select": (c.strategy.multikrum_select
                                    or clients_per_round(c) - c.strategy.num_malicious)},
        check=_check_multikrum, needs_updates=KRUM_NEEDS,
        filters=FILTERING + "krum_filtered"),
    "scaffold": StrategyEntry(
        "SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift",
        keys={"server_lr": SERVER_LR}, implementation="strategies.scaffold:Scaffold",
        arguments=lambda c: {"server_lr": c.strategy.server_lr},
        client=CLIENTS + "ScaffoldClient", client_together=True,
        answers={"scaffold-control-delta": "scaffold-control"}, sgd_only=True, sum_weight="1"),
    "fednova": StrategyEntry(
        "FedNova (Wang et al. 2020): updates normalised by local steps",
        implementation="strategies.fednova:FedNova", client=CLIENTS + "FedNovaClient",
        client_together=True,
        reply_metrics={"fednova-a": ReplyMetric(float, gt=0, equals=_fednova_a)}, sgd_only=True,
        sum_weight=EXAMPLES + "/fednova-a"),
    "feddyn": StrategyEntry(
        "FedDyn (Acar et al. 2021): dynamic regularisation of the local objective",
        keys={"feddyn_alpha": Key(0.01, "dynamic regulariser weight alpha (Acar et al. "
                                        "2021)", gt=0)},
        implementation="strategies.feddyn:FedDyn",
        arguments=lambda c: {"alpha": c.strategy.feddyn_alpha},
        client=CLIENTS + "FedDynClient", client_together=True, sum_weight="1"),
    "rfa": StrategyEntry(
        "RFA (Pillutla et al. 2022): geometric median of the client models",
        keys={"rfa_iterations": RFA_ITERATIONS, "rfa_smoothing": RFA_SMOOTHING},
        implementation="strategies.rfa:RFA",
        arguments=lambda c: {"iterations": c.strategy.rfa_iterations,
                             "smoothing": c.strategy.rfa_smoothing},
        needs_updates="its geometric median reweights every individual update by its distance"),
    "centered_clipping": StrategyEntry(
        "centred clipping (Karimireddy et al. 2021): updates clipped around the previous "
        "aggregate, the server's momentum",
        keys={"cc_tau": Key(1.0, "centred clipping: the radius tau around the previous "
                                 "aggregate update", gt=0),
              "cc_iterations": Key(1, "centred clipping: clipping iterations per round", ge=1,
                                   le=100)},
        implementation="strategies.centered_clipping:CenteredClipping",
        arguments=lambda c: {"tau": c.strategy.cc_tau, "iterations": c.strategy.cc_iterations},
        needs_updates="it clips every individual update around the previous aggregate"),
    "bucketing": StrategyEntry(
        "bucketing (Karimireddy et al. 2022): a robust aggregator over the means of random "
        "buckets of updates",
        keys={"bucket_size": Key(2, "bucketing: updates per bucket (s)", ge=1),
              "bucketing_inner": Key("fedmedian", "bucketing: the robust aggregator of the "
                                                  "bucket means", choices=BUCKETING_INNER),
              "num_malicious": NUM_MALICIOUS, "trim_beta": TRIM_BETA,
              "multikrum_select": MULTIKRUM_SELECT, "rfa_iterations": RFA_ITERATIONS,
              "rfa_smoothing": RFA_SMOOTHING},
        implementation="strategies.bucketing:Bucketing",
        arguments=lambda c: {"bucket_size": c.strategy.bucket_size, "seed": c.run.seed},
        components=lambda c: {"inner": _bucketing_inner(c)},
        check=_check_bucketing,
        needs_updates="it shuffles the individual updates into buckets"),
    "fltrust": StrategyEntry(
        "FLTrust (Cao et al. 2021): updates weighted by their cosine with the server's update "
        "on its root data, rescaled to its norm",
        keys={"fltrust_root_examples": Key(100, "FLTrust: the server's root dataset, this many "
                                                "rows drawn with run.seed from the clients' "
                                                "training rows", ge=1)},
        implementation="strategies.fltrust:FLTrust",
        components=lambda c: {"root_update": import_object(
            "fedtune.server.root_data:RootTrainer")(c)},
        filters=FILTERING + "fltrust_filtered",
        needs_updates="it scores every individual update against the server's own"),
    "norm_bound_dp": StrategyEntry(
        "norm bounding + weak DP (Sun et al. 2019): updates clipped, Gaussian noise on the mean",
        keys={"norm_bound": Key(1.0, "norm_bound_dp: the largest L2 norm of an update", gt=0),
              "dp_noise_std": Key(0.001, "norm_bound_dp: std of the Gaussian noise on each "
                                         "coordinate of the mean update (a defence, not a "
                                         "privacy guarantee)", ge=0)},
        implementation="strategies.norm_bound_dp:NormBoundDP",
        arguments=lambda c: {"norm_bound": c.strategy.norm_bound,
                             "noise_std": c.strategy.dp_noise_std, "seed": c.run.seed},
        needs_updates="it clips every individual update before averaging"),
    "flame": StrategyEntry(
        "FLAME (Nguyen et al. 2022): HDBSCAN of the updates' cosine distances keeps the "
        "majority cluster, clipped to the median norm, mean plus noise scaled to that norm",
        keys={"flame_lambda": Key(0.001, "FLAME: noise level lambda, std lambda times the "
                                         "round's median update norm (the paper's 0.001 for "
                                         "image and text classification)", ge=0)},
        implementation="strategies.flame:Flame",
        arguments=lambda c: {"noise_lambda": c.strategy.flame_lambda, "seed": c.run.seed},
        filters=FILTERING + "flame_filtered",
        needs_updates="it clusters and clips every individual update"),
    "bulyan": StrategyEntry(
        "Bulyan (El Mhamdi et al. 2018): Multi-Krum's selection, then per coordinate the mean "
        "of the values closest to the median",
        keys={"num_malicious": NUM_MALICIOUS}, implementation=FLOWER + "Bulyan",
        arguments=lambda c: {"num_malicious_nodes": c.strategy.num_malicious},
        check=_check_bulyan,
        needs_updates="it selects and trims the individual updates by their distances"),
    "fedbuff": StrategyEntry(
        "FedBuff (Nguyen et al. 2022): asynchronous; the server applies the mean of every K "
        "updates it receives, each weighted by 1/sqrt(1 + staleness)",
        keys={"concurrency": CONCURRENCY, "eval_every": EVAL_EVERY, "server_lr": SERVER_LR,
              "fedbuff_buffer_size": Key(10, "FedBuff: updates K per server step", ge=1)},
        implementation="strategies.fedbuff:FedBuff",
        arguments=lambda c: {"buffer_size": c.strategy.fedbuff_buffer_size,
                             "server_lr": c.strategy.server_lr},
        asynchronous=True, check=lambda c: _check_asynchronous(c),
        dp_release="strategies.dp_fedbuff:DPFedBuff",
        needs_updates="it weights each update by its own staleness"),
    "fedasync": StrategyEntry(
        "FedAsync (Xie et al. 2019): asynchronous; the server mixes in each update as it "
        "arrives, x <- (1 - a_s) x + a_s x_client, a_s = alpha s(staleness)",
        keys={"concurrency": CONCURRENCY, "eval_every": EVAL_EVERY,
              "fedasync_alpha": Key(0.6, "FedAsync: mixing weight alpha", gt=0, le=1),
              "fedasync_staleness": Key("polynomial", "FedAsync: s(t) = 1 (constant), "
                                                      "(t + 1)^-a (polynomial), 1 for t <= b "
                                                      "else 1 / (a (t - b) + 1) (hinge)",
                                        choices=("constant", "polynomial", "hinge")),
              "fedasync_a": Key(0.5, "FedAsync: staleness exponent / slope a", ge=0),
              "fedasync_b": Key(4, "FedAsync: hinge staleness b", ge=0)},
        implementation="strategies.fedasync:FedAsync",
        arguments=lambda c: {"alpha": c.strategy.fedasync_alpha,
                             "staleness": c.strategy.fedasync_staleness,
                             "a": c.strategy.fedasync_a, "b": c.strategy.fedasync_b},
        asynchronous=True, check=lambda c: _check_asynchronous(c),
        needs_updates="it mixes each update into the model as it arrives"),
}


def _check_asynchronous(config: Config) -> None:
    """The strategy keys an asynchronous strategy refuses, each with its reason (the privacy
    mode and the runtime say their own: ``fedtune.tables.devices.check_asynchronous``)."""
    s = config.strategy
    for name, reason in ASYNC_REFUSED.items():
        if getattr(s, name):
            raise ConfigError(f"strategy.{name} = {getattr(s, name)!r} is not allowed with "
                              f"strategy.name = {s.name!r}: must be off ({reason})")


FINETUNE_KEYS = {
    "finetune_steps": Key(20, "local steps of the final model each client fine-tunes at "
                              "evaluation (finetune, fedbabu)", ge=0),
    "finetune_part": Key("head", "what the evaluation's fine-tuning trains: head, or full "
                                 "(every travelling tensor; with model.transfer = lora the "
                                 "adapters and the head)", choices=("head", "full")),
}
# FedAvg's server; under central DP plain DP-FedAvg of the replies, the shared part (a reply's
# personal part is the global values; what a client keeps is outside the guarantee)
PERSONAL = dict(implementation=FLOWER + "FedAvg", weighted_mean=True, sum_weight=EXAMPLES,
                dp_server_optimizer=_dp_sgd,
                client="fedtune.client.personal:PersonalClient")


def _check_shared_body(config: Config) -> None:
    """FedPer, FedRep and FedBABU share the body: with a frozen encoder nothing of it travels
    (model.feature_cache even drops it), so there would be nothing to federate."""
    if config.model.transfer == "frozen":
        raise ConfigError(
            f"model.transfer = 'frozen' is not allowed with strategy.name = "
            f"{config.strategy.name!r}: must be 'full', 'top_k' or 'lora' (it shares the body, "
            "and a frozen encoder's body does not travel: only the personal head would train)")


STRATEGIES.update({
    "finetune": StrategyEntry(
        "FedAvg, then each client fine-tunes the global model on its own data (local "
        "adaptation; Wang et al. 2019)",
        keys=FINETUNE_KEYS, personal="fedtune.personal.finetune:FineTune",
        shared_part="model", **{**PERSONAL, "client": ""}),  # FedAvg's training, any privacy
    "fedbabu": StrategyEntry(
        "FedBABU (Oh et al. 2022): the body trains under a fixed random head; each client "
        "fine-tunes at evaluation",
        keys=FINETUNE_KEYS, personal="fedtune.personal.fedbabu:FedBABU", shared_part="body",
        check=_check_shared_body, **PERSONAL, client_together=True),
    "fedper": StrategyEntry(
        "FedPer (Arivazhagan et al. 2019): shared body, personal head, trained together",
        personal="fedtune.personal.fedper:FedPer", personal_part="head", shared_part="body",
        check=_check_shared_body, **PERSONAL, client_together=True),
    "fedrep": StrategyEntry(
        "FedRep (Collins et al. 2021): personal head trained first, then the shared body",
        keys={"fedrep_head_epochs": Key(2, "epochs of head-only training before the body's "
                                           "(Collins et al. 2021)", ge=1)},
        personal="fedtune.personal.fedrep:FedRep", personal_part="head", shared_part="body",
        check=_check_shared_body, **PERSONAL, client_together=True),
    "ditto": StrategyEntry(
        "Ditto (Li et al. 2021): a personal model pulled towards the global one by lambda",
        keys={"ditto_lambda": Key(0.1, "proximal weight lambda of the personal model (Li et "
                                       "al. 2021 search 0.01-2)", ge=0)},
        personal="fedtune.personal.ditto:Ditto", personal_part="model", shared_part="model",
        **PERSONAL, client_together=True),
    "apfl": StrategyEntry(
        "APFL (Deng et al. 2020): a local model mixed with the global one by a learnt alpha",
        keys={"apfl_alpha": Key(0.25, "initial mixing weight alpha of the local model (Deng "
                                      "et al. 2020)", ge=0, le=1),
              "apfl_alpha_lr": Key(0.01, "learning rate of alpha; 0 keeps it fixed", ge=0)},
        personal="fedtune.personal.apfl:APFL", personal_part="model", shared_part="model",
        **PERSONAL),
    "fedsa_lora": StrategyEntry(
        "FedSA-LoRA (Guo et al. 2025): LoRA's A matrices shared, its B matrices personal",
        personal="fedtune.personal.fedsa_lora:FedSALoRA", personal_part="lora_B",
        shared_part="lora_A and the head",
        requires={"model.kind": "hf", "model.transfer": "lora"},
        requires_why="its clients keep the LoRA adapters' B matrices", **PERSONAL),
})


def _check_secure_aggregation(config: Config) -> None:
    """SecAgg+ needs a weighted-sum strategy, the server's own sum, and at least 3 clients."""
    s = config.strategy
    if not s.secure_aggregation:
        if config.faults.crash_stage != "train":
            raise ConfigError(
                f"faults.crash_stage = {config.faults.crash_stage!r} is not allowed with "
                "strategy.secure_aggregation = false: must be 'train' (the other stages are "
                "SecAgg+'s)")
        return
    entry = STRATEGIES[s.name]
    if entry.needs_updates:
        raise ConfigError(
            f"strategy.secure_aggregation = true is not allowed with strategy.name = {s.name!r}:"
            f" {entry.needs_updates}, and SecAgg+ shows the server only the sum; use one of "
            + ", ".join(name for name, e in STRATEGIES.items() if e.sum_weight))
    for bound in ("max_update_norm", "update_norm_z"):
        if getattr(s, bound):
            raise ConfigError(
                f"strategy.{bound} = {getattr(s, bound):g} is not allowed with "
                "strategy.secure_aggregation = true: must be 0 (the server sees no single "
                "update to bound; under central DP each client clips its own)")
    check_secure_cohort(config, clients_per_round(config))
    if s.secagg_degree % 2:
        raise ConfigError(
            f"strategy.secagg_degree = {s.secagg_degree} is not allowed: must be even (k/2 "
            "neighbours on each side of a ring) or 0 (every other sampled client)")


def check_secure_cohort(config: Config, cohort: float) -> None:
    """SecAgg+ needs at least 3 clients per round (``cohort``: how many are sampled, or
    expected under Poisson sampling)."""
    if config.strategy.secure_aggregation and cohort < 3:
        raise ConfigError(
            f"strategy.fraction_train = {config.strategy.fraction_train:g} is not allowed with "
            f"strategy.secure_aggregation = true: {cohort:g} clients per round, at least 3 "
            "needed (a sum of two reveals each to the other)")


def check_strategy(config: Config) -> None:
    """The chosen strategy's checks that involve other keys."""
    _check_secure_aggregation(config)
    entry = STRATEGIES[config.strategy.name]
    if entry.sgd_only and config.client.optimizer != "sgd":
        raise ConfigError(
            f"client.optimizer = {config.client.optimizer!r} is not allowed with strategy.name "
            f"= {config.strategy.name!r}: must be 'sgd' (its update rule assumes local SGD "
            "steps)"
        )
    for key, value in entry.requires.items():
        section, _, name = key.partition(".")
        if getattr(getattr(config, section), name) != value:
            raise ConfigError(
                f"{key} = {getattr(getattr(config, section), name)!r} is not allowed with "
                f"strategy.name = {config.strategy.name!r}: must be {value!r} "
                f"({entry.requires_why})")
    if entry.check is not None:
        entry.check(config)


def strategy_arguments(config: Config) -> dict[str, Any]:
    """Constructor arguments of the chosen strategy taken from ``[strategy]`` (its own keys;
    keys of other strategies are ignored, so one sweep file can set them all)."""
    return STRATEGIES[config.strategy.name].arguments(config)
