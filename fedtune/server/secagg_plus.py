"""SecAgg+ for Flower's Message API: the server sees only the weighted sum of the updates.

Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, on Bonawitz et al., CCS 2017. ``SecAggPlus`` wraps any
strategy whose aggregate needs only the weighted means of the replies' ArrayRecords (its
``sum_weight`` in ``fedtune.tables.strategies``) and runs the protocol over Flower's ``Grid``,
so the round loop does not change:

- ``configure_train``: the wrapped strategy samples the cohort and builds its train messages;
  then **setup** (each client gets the settings and the public graph seed, answers two public
  keys) and **share-keys** (each client gets its neighbours' keys, answers its shares sealed
  for each neighbour and a commitment to its self-mask seed) run as ``query.secagg`` messages,
  and the train messages of the clients still in go out carrying the shares sealed for them;
- the round's train exchange is the **masked-input** stage: a reply carries one masked vector
  (``fedtune.client.secagg_stages``) instead of the summed records;
- ``aggregate_train``: the masked vectors are summed; **unmask** asks each survivor for the
  self-mask seed shares of its surviving neighbours and the key shares of its dropped ones; the
  server reconstructs every seed (checked against the commitment or the public key, so a
  tampered share is found and left out), removes the masks, dequantises the weighted mean and
  hands the wrapped strategy every accepted reply with its summed records replaced by that
  mean. A strategy that weights replies by ``sum_weight`` then computes exactly what it would
  from the individual replies (FedAvg's mean, SCAFFOLD's and FedDyn's sums, FedNova's
  normalised mean) while each reply keeps the client's own metrics.

A round fails - no aggregate, the global model stays, the run goes on - when at any stage
fewer than ``t`` of a client's neighbours, or fewer than the threshold share of the cohort,
remain, or when the unmasked sum lies outside what in-range inputs can add up to.
``finish_round`` reports who dropped at which stage (``SecAggRecorder`` writes it into
clients.csv).

One client cannot make others drop or take the blame: the server forwards only what it can
check - public keys that are P-384 points, a 32-byte commitment, ciphertexts of the sealed form,
and shares only between two clients whose commitments to their direction keys agree (a pair
that disagrees does not mask with each other; neither is blamed, one of them lies). A receiver
that cannot open a forwarded share leaves its sender out and reveals that direction's key; the
server checks the key against both commitments and opens the share itself: it does not open,
the sender is rejected; it opens, the receiver is. Either way the one at fault leaves the sum
(as a dropout: its pairwise masks are removed with its neighbours' key shares) and the round
goes on. A commitment of the right form that matches no seed (or shares that reconstruct no
seed) is found only at unmask: the round fails, and when more than ``t`` shares arrived (so no
one lying holder can be the cause: ``keys.recover`` leaves any one out) its dealer is the
round's ``culprit`` and is left out of every later round (``excluded``, checkpointed), so it
stops one round, not the run. What the server cannot check is a masked input inside the
ring: one that pushes the sum beyond the range fails the round (nobody can say whose it was);
one inside the range moves the mean unseen (README, "Secure aggregation").

Trust: the server is honest but curious - it follows the protocol and may read everything it
receives; it learns the sum of the survivors' quantised updates and nothing else, even if it
lies about who dropped (a neighbour reveals one of a client's two secrets, and ``t`` is more
than half of them). The clients trust the server to sample and announce the cohort (a server
that invents clients could isolate one; Bell et al. close this with a PKI, which a fedtune
deployment has in SuperNode authentication, not in the protocol). Metrics (loss, example
counts) travel in clear. Under distributed DP the clients clip and noise their own updates
(``strategies.dp_fedavg``); the noise is secret from the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtune import protocol
from fedtune.errors import one_line
from fedtune.secagg import distributed_dp, graph, keys, masking
from fedtune.server.exchange import exchange

_GRAPH_STREAM = 0x5EC6  # seed stream of the public neighbour graph
AUTO_CLIP_RANGE = 1.0  # strategy.secagg_clip_range = 0 without DP (distributed_dp's with it)


@dataclass
class SecAggSettings:
    """The run's SecAgg+ settings (``[strategy]`` secagg keys; checkpointed with the strategy,
    so not frozen)."""

    degree: int  # k; 0 = every other sampled client
    threshold: float  # share of neighbours / of the cohort that must remain
    bits: int
    clip_range: float  # 0 = automatic
    timeout_s: float  # longest wait for one stage's replies
    seed: int  # the run's seed: the public graph seeds come from it
    sum_weight: str  # what weights a client's input (the strategy's sum_weight, or "1")
    answers: Mapping[str, str] = field(default_factory=dict)  # the strategy's answers
    max_weight: int = protocol.MAX_ANY_EXAMPLES  # bound on a sum of client weights
    # distributed DP (the privacy mode's ``secure_sum_noise``): each client clips its update
    # to ``dp_clip`` and adds its share of noise of std ``dp_noise_multiplier × dp_clip``
    dp_clip: float = 0.0  # 0 = the clients neither clip nor noise
    dp_noise_multiplier: float = 0.0
    # a personalised strategy's personal part (``fedtune.personal.split.kept_names``): tensors
    # of the model no client sends, masked or not; the aggregate keeps the sent values there
    kept: tuple[str, ...] = ()


@dataclass
class Dropout:
    """A client that left the protocol: at which stage, how and why."""

    node: int
    stage: str
    status: str  # failed (error reply), timeout, rejected (a reply that breaks the protocol)
    reason: str


@dataclass
class RoundReport:
    """What the protocol did in one round (``SecAggPlus.finish_round``)."""

    server_round: int
    sampled: list[int] = field(default_factory=list)  # the cohort the strategy sampled
    trained: list[int] = field(default_factory=list)  # the nodes sent a train message
    survivors: list[int] = field(default_factory=list)  # nodes whose input is in the sum
    dropped: list[Dropout] = field(default_factory=list)
    tampered: dict[int, list[int]] = field(default_factory=dict)  # holder -> owners
    disagreeing: list[tuple[int, int]] = field(default_factory=list)  # pairs that do not mask
    culprit: int | None = None  # the node whose secret could not be recovered (failed round)
    culprit_reason: str = ""  # why it is left out of every later round
    excluded: dict[int, str] = field(default_factory=dict)  # sampled, left out: why
    failed: str = ""  # why no aggregate came out ("" = it did)
    bytes_up: int = 0  # SecAgg+ stage messages (the masked vectors count as train replies)
    bytes_down: int = 0
    # CPU seconds of the server's own protocol work (process time, so Shamir's worker threads
    # count; the waits for replies do not)
    server_s: float = 0.0
    node_to_client: dict[int, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class RoundFailed(Exception):
    """Too few clients or shares remain: this round produces no aggregate."""


def _record_bytes(record: ConfigRecord) -> int:
    """The payload bytes of a ConfigRecord (Flower's ``count_bytes`` fails on an empty list):
    keys, bytes and strings as long as they are, numbers 8 bytes each."""
    def size(value: Any) -> int:
        return len(value) if isinstance(value, (bytes, str)) else 8

    return sum(len(key) + (sum(map(size, value)) if isinstance(value, list) else size(value))
               for key, value in record.items())


def _reason(reply: Message) -> str:
    """The last line of a client's error (runtimes wrap it in tracebacks)."""
    lines = [line.strip() for line in reply.error.reason.strip().splitlines() if line.strip()]
    return one_line(lines[-1] if lines else "unknown error")


@dataclass
class _Session:
    """One round's protocol state (kept between ``configure_train`` and ``aggregate_train``)."""

    grid: Grid
    session: str
    server_round: int
    threshold: int  # t
    min_survivors: int
    ring_bits: int
    clip_range: float
    summed: list[masking.SummedRecord]
    reference: RecordDict  # the sent records every summed value refers to
    report: RoundReport
    neighbours: dict[int, frozenset[int]] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)
    mask_keys: dict[int, bytes] = field(default_factory=dict)
    seal_keys: dict[int, bytes] = field(default_factory=dict)
    commitments: dict[int, bytes] = field(default_factory=dict)
    sealed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # src -> dst -> share
    seal_out: dict[int, dict[int, bytes]] = field(default_factory=dict)  # key commitments
    pairs: dict[int, list[int]] = field(default_factory=dict)  # node -> its pairwise set
    instructions: dict[int, Message] = field(default_factory=dict)
    dp_clip: float = 0.0
    dp_std: float = 0.0
    dp_clip_bound: float = 0.0  # η: the quantiser clips a noised coordinate at most this often


class SecAggPlus(Strategy):
    """SecAgg+ around a weighted-sum strategy (``inner``)."""

    def __init__(self, inner: Strategy, settings: SecAggSettings) -> None:
        self.inner = inner
        self.settings = settings
        self._session: _Session | None = None
        self._report: RoundReport | None = None
        # node id -> why it is left out of every later round: the culprits of failed rounds
        # (checkpointed with the strategy, so the keys are strings and a resume keeps them)
        self.excluded: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"SecAggPlus({self.inner!r}, k={self.settings.degree})"

    # --- the round's reports ---

    def finish_round(self) -> RoundReport | None:
        """The finished round's report (None: the round ran no protocol); forgets the round and
        leaves its culprit out of every later one (here, after the round: a refused aggregate
        puts the strategy's attributes back as they were before it aggregated)."""
        report = self._report
        self._session, self._report = None, None
        if report is not None and report.culprit is not None:
            self.excluded[str(report.culprit)] = report.culprit_reason
        return report

    def _drop(self, s: _Session, node: int, stage: str, status: str, reason: str) -> None:
        s.alive.discard(node)
        s.report.dropped.append(Dropout(node, stage, status, reason))

    def _fail(self, s: _Session, reason: str) -> None:
        s.report.failed = reason
        raise RoundFailed(reason)

    def _check_remaining(self, s: _Session, holders: Mapping[int, Iterable[int]], what: str
                         ) -> None:
        """Enough clients remain, and each client ``holders`` names has ``t`` holders left."""
        if len(s.alive) < s.min_survivors:
            self._fail(s, f"{len(s.alive)} of {len(s.report.sampled)} clients remain after {what}, "
                          f"{s.min_survivors} needed (strategy.secagg_threshold)")
        for node, holding in holders.items():
            left = len(set(holding) & s.alive)
            if left < s.threshold:
                self._fail(s, f"node {node} has {left} neighbours left after {what}, "
                              f"{s.threshold} needed to recover it")

    # --- one stage's messages ---

    def _stage(self, s: _Session, stage: str, values: Mapping[int, dict[str, Any]]
               ) -> dict[int, ConfigRecord]:
        """Send every node its stage values; return the well-formed replies by node (the other
        nodes are dropped at ``stage``)."""
        messages = []
        for node, node_values in values.items():
            record = ConfigRecord({protocol.SA_STAGE: stage, protocol.SA_SESSION: s.session,
                                   **node_values})
            s.report.bytes_down += _record_bytes(record)
            messages.append(Message(RecordDict({protocol.SECAGG: record}), dst_node_id=node,
                                    message_type=protocol.SECAGG_MESSAGE_TYPE,
                                    group_id=str(s.server_round)))
        done = exchange(s.grid, messages, self.settings.timeout_s)
        started = time.process_time()
        answered: dict[int, ConfigRecord] = {}
        for reply in done.replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                status = ("timeout" if reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
                          else "failed")
                self._drop(s, node, stage, status, _reason(reply))
                continue
            record = reply.content.config_records.get(protocol.SECAGG)
            s.report.bytes_up += 0 if record is None else _record_bytes(record)
            problem = self._malformed(s, record, stage)
            if problem:
                self._drop(s, node, stage, "rejected", problem)
            else:
                answered[node] = record
        for node in done.timed_out:
            self._drop(s, node, stage, "timeout", "no reply within strategy.round_timeout_s")
        log(INFO, "round %s: secagg %s: %s of %s clients answered", s.server_round, stage,
            len(answered), len(messages))
        s.report.server_s += time.process_time() - started
        return answered

    @staticmethod
    def _malformed(s: _Session, record: ConfigRecord | None, stage: str) -> str:
        if record is None:
            return f"no {protocol.SECAGG!r} record in the reply"
        if record.get(protocol.SA_SESSION) != s.session:
            return "a reply of another session (replayed)"
        if record.get(protocol.SA_STAGE) != stage:
            return f"a reply to stage {record.get(protocol.SA_STAGE)!r} instead of {stage!r}"
        return ""

    # --- configure_train: setup and share-keys ---

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's train messages, after the key set-up, for the clients still
        in (none when the round failed); the culprits of earlier rounds are left out."""
        self._session = None
        sampled = list(self.inner.configure_train(server_round, arrays, config, grid))
        # a culprit of an earlier round is sampled as before (the wrapped strategy's
        # population and sampling do not change) but never set up: it stopped a round once
        excluded = {m.metadata.dst_node_id: self.excluded[str(m.metadata.dst_node_id)]
                    for m in sampled if str(m.metadata.dst_node_id) in self.excluded}
        instructions = [m for m in sampled if m.metadata.dst_node_id not in excluded]
        self._report = RoundReport(server_round, [m.metadata.dst_node_id for m in instructions],
                                   excluded=excluded)
        if not instructions:
            return []
        try:
            s = self._new_session(grid, server_round, instructions)
            self._session = s
            self._setup(s)
            self._share_keys(s)
        except RoundFailed:
            return []
        self._report.trained = sorted(s.alive)
        return [s.instructions[node] for node in sorted(s.alive)]

    def _new_session(self, grid: Grid, server_round: int, instructions: list[Message]
                     ) -> _Session:
        started = time.process_time()
        settings, report = self.settings, self._report
        assert report is not None
        nodes = [m.metadata.dst_node_id for m in instructions]
        cohort = len(nodes)
        degree = graph.effective_degree(settings.degree, cohort)
        reference = instructions[0].content
        sent = [name for name, record in reference.items() if isinstance(record, ArrayRecord)]
        s = _Session(
            grid=grid, session=keys.new_session(), server_round=server_round,
            threshold=graph.share_threshold(degree, settings.threshold),
            min_survivors=graph.min_survivors(cohort, degree, settings.threshold),
            ring_bits=64, clip_range=settings.clip_range or AUTO_CLIP_RANGE,
            summed=masking.summed_records(sent, settings.answers, settings.kept),
            reference=reference,
            report=report, alive=set(nodes),
            instructions={m.metadata.dst_node_id: m for m in instructions})
        if cohort < 3 or degree < 2:
            self._fail(s, f"{cohort} clients sampled: SecAgg+ needs at least 3")
        for message in instructions[1:]:
            for name in sent:
                if message.content[name] is not reference[name] and not _same(
                        message.content[name], reference[name]):
                    self._fail(s, f"the strategy sent node {message.metadata.dst_node_id} its "
                                  f"own {name!r}: a secure sum needs one reference")
        if settings.dp_clip:
            s.dp_clip = settings.dp_clip
            s.dp_std = distributed_dp.share_std(settings.dp_noise_multiplier, s.dp_clip,
                                                s.min_survivors)
            coordinates = masking.vector_length(reference, s.summed)
            s.clip_range = settings.clip_range or distributed_dp.automatic_clip_range(
                s.dp_clip, s.dp_std, coordinates, cohort)
            s.dp_clip_bound = distributed_dp.clip_probability(
                s.clip_range, s.dp_clip, s.dp_std, coordinates, cohort)
        max_weight = (cohort if settings.sum_weight == "1" else settings.max_weight
                      * (masking.RATIO_SCALE if "/" in settings.sum_weight else 1))
        s.ring_bits = next((bits for bits in masking.RING_BITS
                            if max_weight <= masking.max_total_weight(bits, settings.bits)), 64)
        s.neighbours = graph.neighbours(nodes, settings.degree, self._graph_seed(server_round))
        report.server_s += time.process_time() - started
        return s

    def _graph_seed(self, server_round: int) -> int:
        return int(np.random.SeedSequence([self.settings.seed, server_round, _GRAPH_STREAM])
                   .generate_state(1)[0])

    def _setup(self, s: _Session) -> None:
        settings = self.settings
        values = {
            protocol.SA_ROUND: s.server_round,
            protocol.SA_NODES: [str(node) for node in sorted(s.alive)],
            protocol.SA_DEGREE: settings.degree, protocol.SA_THRESHOLD: s.threshold,
            protocol.SA_GRAPH_SEED: self._graph_seed(s.server_round),
            protocol.SA_BITS: settings.bits, protocol.SA_RING_BITS: s.ring_bits,
            protocol.SA_CLIP_RANGE: s.clip_range, protocol.SA_DP_CLIP: s.dp_clip,
            protocol.SA_DP_STD: s.dp_std, protocol.SA_WEIGHT: settings.sum_weight,
            protocol.SA_RECORDS: [r.reply for r in s.summed],
            protocol.SA_DELTAS: [r.delta for r in s.summed],
            protocol.SA_KEPT: list(settings.kept),
        }
        replies = self._stage(s, protocol.STAGE_SETUP, {node: values for node in s.alive})
        seen: set[bytes] = set()
        for node, record in sorted(replies.items()):
            mask_key, seal_key = record.get(protocol.SA_PK_MASK), record.get(protocol.SA_PK_SEAL)
            client = record.get(protocol.PARTITION_ID)
            if isinstance(client, int):  # a claim: the recorder takes it for unknown nodes only
                s.report.node_to_client[node] = client
            if (not isinstance(mask_key, bytes) or not isinstance(seal_key, bytes)
                    or {mask_key, seal_key} & seen or mask_key == seal_key):
                self._drop(s, node, protocol.STAGE_SETUP, "rejected",
                           "missing or repeated public keys")
                continue
            if not keys.is_public_key(mask_key) or not keys.is_public_key(seal_key):
                self._drop(s, node, protocol.STAGE_SETUP, "rejected",
                           "a public key that is not a P-384 point (its neighbours could not "
                           "use it)")
                continue
            seen |= {mask_key, seal_key}
            s.mask_keys[node], s.seal_keys[node] = mask_key, seal_key
        self._check_remaining(s, {n: s.neighbours[n] for n in s.alive}, "setup")

    def _share_keys(self, s: _Session) -> None:
        peers = {node: sorted(s.neighbours[node] & s.alive) for node in s.alive}
        values = {node: {protocol.SA_PEERS: [str(p) for p in peers[node]],
                         protocol.SA_PK_MASK: [s.mask_keys[p] for p in peers[node]],
                         protocol.SA_PK_SEAL: [s.seal_keys[p] for p in peers[node]]}
                  for node in s.alive}
        replies = self._stage(s, protocol.STAGE_SHARE_KEYS, values)
        started = time.process_time()
        sealed = s.sealed  # source -> destination -> ciphertext
        seal_in: dict[int, dict[int, bytes]] = {}  # commitments to the peers' keys to a node
        for node, record in sorted(replies.items()):
            problem = _share_keys_problem(record, peers[node])
            if problem:
                self._drop(s, node, protocol.STAGE_SHARE_KEYS, "rejected", problem)
                continue
            destinations = [int(d) for d in record[protocol.SA_PEERS]]
            s.commitments[node] = record[protocol.SA_COMMITMENT]
            sealed[node] = dict(zip(destinations, record[protocol.SA_CIPHERTEXTS], strict=True))
            s.seal_out[node] = dict(zip(destinations, record[protocol.SA_SEAL_OUT], strict=True))
            seal_in[node] = dict(zip(destinations, record[protocol.SA_SEAL_IN], strict=True))
        for u, v in sorted((u, v) for u in sealed for v in sealed[u] if u < v and v in sealed
                           and u in sealed[v]):
            if s.seal_out[u][v] != seal_in[v][u] or s.seal_out[v][u] != seal_in[u][v]:
                del sealed[u][v], sealed[v][u]  # one of them lies: the pair does not mask
                s.report.disagreeing.append((u, v))
        for node in s.alive:
            s.pairs[node] = sorted(src for src in s.alive if node in sealed.get(src, {}))
        self._check_remaining(s, {n: s.pairs[n] for n in s.alive}, "share-keys")
        for node in s.alive:
            original = s.instructions[node]
            content = RecordDict(dict(original.content.items()))
            content[protocol.SECAGG] = ConfigRecord({
                protocol.SA_STAGE: protocol.STAGE_MASKED_INPUT, protocol.SA_SESSION: s.session,
                protocol.SA_PEERS: [str(src) for src in s.pairs[node]],
                protocol.SA_CIPHERTEXTS: [sealed[src][node] for src in s.pairs[node]]})
            s.report.bytes_down += _record_bytes(content[protocol.SECAGG])
            s.instructions[node] = Message(content, dst_node_id=node,
                                           message_type=original.metadata.message_type,
                                           group_id=original.metadata.group_id)
        s.report.server_s += time.process_time() - started

    # --- aggregate_train: unmask ---

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and let the wrapped strategy aggregate it."""
        s, report = self._session, self._report
        replies = list(replies)
        if report is None:  # configure_train did not run this round
            return self.inner.aggregate_train(server_round, replies)
        if s is None or report.failed:
            return None, self._metrics(report)
        try:
            inputs = self._inputs(s, replies)
            total = self._unmask(s, inputs)
            total_weight = sum(weight for _, weight, _ in inputs.values())
            outside = masking.outside_range(total, total_weight, self.settings.bits,
                                            len(inputs))
            if outside:
                self._fail(s, outside)
        except RoundFailed:
            return None, self._metrics(report)
        started = time.process_time()
        graph_seed, length = self._graph_seed(server_round), len(total) - 1
        # in node order: a float sum must not depend on the order the replies arrived in
        dither_sum = sum(inputs[node][1] * masking.dither(masking.dither_seed(graph_seed, node),
                                                          length) for node in sorted(inputs))
        mean, clipped = masking.decode_mean(total, total_weight, s.clip_range,
                                            self.settings.bits, dither_sum)
        records = masking.unflatten(mean, s.reference, s.summed)
        stand_ins = [self._stand_in(reply, records) for reply, _, _ in inputs.values()]
        report.survivors = sorted(inputs)
        report.metrics = {
            protocol.SECAGG_ROUNDING_BOUND: masking.rounding_bound(s.clip_range,
                                                                   self.settings.bits),
            protocol.SECAGG_CLIPPED: clipped}
        if s.dp_std:
            report.metrics[protocol.SECAGG_DP_CLIP_BOUND] = s.dp_clip_bound
        report.server_s += time.process_time() - started
        arrays, metrics = self.inner.aggregate_train(server_round, stand_ins)
        metrics = MetricRecord(dict(metrics or {}))
        metrics.update(self._metrics(report))
        return arrays, metrics

    @staticmethod
    def _metrics(report: RoundReport) -> MetricRecord:
        return report_metrics(report)

    def _inputs(self, s: _Session, replies: list[Message]
                ) -> dict[int, tuple[Message, int, np.ndarray]]:
        """(reply, weight, masked vector) of every sound masked reply, by node; the nodes
        that were sent a train message and have none are dropped at masked-input."""
        started = time.process_time()
        dtype = masking.ring_dtype(s.ring_bits)
        length = masking.vector_length(s.reference, s.summed) + 1
        inputs = {}
        claims: dict[int, list[Refusal]] = {}  # receiver -> the shares it says did not open
        for reply in replies:
            node = reply.metadata.src_node_id
            problem = self._malformed(s, reply.content.config_records.get(protocol.SECAGG),
                                      protocol.STAGE_MASKED_INPUT)
            if node not in s.alive or node in inputs:
                problem = problem or "a masked input from a node not in this round"
            vector = None
            if not problem:
                record = reply.content.array_records.get(protocol.SECAGG_MASKED)
                array = None if record is None else record.get(protocol.MASKED)
                vector = None if array is None else array.numpy()
                if vector is None or vector.dtype != dtype or vector.shape != (length,):
                    problem = f"the masked input is not {length} {dtype} values"
            weight = 0
            if not problem:
                try:
                    weight = masking.integer_weight(self.settings.sum_weight,
                                                    reply.content[protocol.METRICS])
                except (KeyError, ValueError) as error:
                    problem = f"no weight: {error}"
            refusals: list[Refusal] = []
            if not problem:
                refusals, problem = _refusals(reply.content.config_records[protocol.SECAGG],
                                              s.pairs[node])
            if problem:
                self._drop(s, node, protocol.STAGE_MASKED_INPUT, "rejected", problem)
            else:
                inputs[node] = (reply, weight, vector)
                claims[node] = refusals
        for receiver, refused in sorted(claims.items()):
            for source, key, received in refused:
                if receiver in s.alive:
                    self._judge(s, inputs, source, receiver, key, received)
        for node in sorted(s.alive - set(inputs)):
            self._drop(s, node, protocol.STAGE_MASKED_INPUT, "failed",
                       "no sound masked input (see its clients.csv row)")
        s.report.server_s += time.process_time() - started
        self._check_remaining(s, {n: s.pairs[n] for n in s.alive}, "masked-input")
        dead = {n for n in s.instructions if n not in s.alive and s.pairs.get(n)}
        self._check_remaining(s, {n: s.pairs[n] for n in dead}, "masked-input")
        total_weight = sum(weight for _, weight, _ in inputs.values())
        if total_weight > masking.max_total_weight(s.ring_bits, self.settings.bits):
            self._fail(s, f"the weights sum to {total_weight}, more than the ring holds")
        if total_weight == 0:
            self._fail(s, "the weights sum to 0")
        return inputs

    def _judge(self, s: _Session, inputs: dict[int, Any], source: int, receiver: int,
               key: bytes, received: bytes) -> None:
        """``receiver`` says ``source``'s share did not open, revealing the key: whoever is
        wrong leaves the sum, rejected with the reason. A sender at fault also loses its pair
        with the receiver (the receiver neither masked with it nor holds its shares). A share
        that arrived other than it was forwarded (no TLS) is nobody's fault: the receiver,
        which did not mask with the sender, leaves the sum as failed."""
        status = "rejected"
        if received != s.sealed[source][receiver]:
            culprit, status, reason = receiver, "failed", (
                f"node {source}'s share was altered on its way to it (by neither client): it "
                "left the sum")
        elif keys.key_commitment(s.session, source, receiver, key) != s.seal_out[source][
                receiver]:
            culprit, reason = receiver, (f"it says node {source}'s share does not open but "
                                         "reveals another key than the two committed to")
        else:
            try:
                shares = keys.open_sealed(key, s.sealed[source][receiver], s.session, source,
                                          receiver)
                sound = all(len(share) == keys.SHARE_BYTES for share in shares)
            except keys.ShareRejected:
                sound = False
            culprit, reason = (receiver, f"it says node {source}'s share does not open, but it "
                                         "opens with the key it revealed") if sound else (
                source, f"its share for node {receiver} does not open (checked with the key "
                        "that node revealed)")
        if culprit == source:
            s.pairs[receiver] = [n for n in s.pairs[receiver] if n != source]
            s.pairs[source] = [n for n in s.pairs[source] if n != receiver]
        inputs.pop(culprit, None)
        if culprit in s.alive:
            self._drop(s, culprit, protocol.STAGE_MASKED_INPUT, status, reason)

    def _unmask(self, s: _Session, inputs: Mapping[int, tuple[Message, int, np.ndarray]]
                ) -> np.ndarray:
        """The unmasked sum of the encoded inputs."""
        survivors = set(inputs)
        sent_pairs = {n: p for n, p in s.pairs.items() if p}
        dead = {n for n in sent_pairs if n not in survivors}
        requests = {node: {protocol.SA_ALIVE: [str(p) for p in s.pairs[node] if p in survivors],
                           protocol.SA_DEAD: [str(p) for p in s.pairs[node] if p in dead]}
                    for node in survivors}
        replies = self._stage(s, protocol.STAGE_UNMASK, requests)
        started = time.process_time()
        seed_shares: dict[int, dict[int, bytes]] = {n: {} for n in survivors}
        key_shares: dict[int, dict[int, bytes]] = {n: {} for n in dead}
        for holder, record in replies.items():
            owners = [int(o) for o in record.get(protocol.SA_OWNERS, [])]
            shares = list(record.get(protocol.SA_SHARES, []))
            asked = {int(o) for o in requests[holder][protocol.SA_ALIVE]} | {
                int(o) for o in requests[holder][protocol.SA_DEAD]}
            if sorted(owners) != sorted(asked) or len(shares) != len(owners):
                self._drop(s, holder, protocol.STAGE_UNMASK, "rejected",
                           "shares of other nodes than asked")
                continue
            for owner, share in zip(owners, shares, strict=True):
                (seed_shares if owner in survivors else key_shares)[owner][holder] = share
        total = np.zeros_like(next(iter(inputs.values()))[2])
        for _, _, vector in inputs.values():
            total += vector
        for owner in sorted(survivors):
            seed = self._recover(s, owner, seed_shares[owner], keys.seed_check(
                s.session, owner, s.commitments[owner]), "self-mask seed")
            masking.add_mask(total, seed, -1)
        for owner in sorted(dead):
            seed = self._recover(s, owner, key_shares[owner], keys.key_check(
                s.mask_keys[owner]), "mask key")
            private = keys.mask_private_key(seed)
            for peer in s.pairs[owner]:
                if peer in survivors:
                    pair_seed = keys.pairwise_seed(private, s.mask_keys[peer])
                    masking.add_mask(total, pair_seed, -masking.pair_sign(peer, owner))
        s.report.server_s += time.process_time() - started
        return total

    def _recover(self, s: _Session, owner: int, shares: Mapping[int, bytes], check: Any,
                 what: str) -> bytes:
        try:
            secret, tampered = keys.recover(shares, s.threshold, check)
        except keys.RecoveryFailed as error:
            if len(shares) <= s.threshold:  # too few holders answered, or one of t lied
                self._fail(s, f"node {owner}'s {what} cannot be recovered: {error} (too few "
                              "of its holders answered to tell whose fault it is)")
            # more than t shares and no t of them open it: not one lying holder (keys.recover
            # leaves any one out) but the owner, which dealt the shares and the commitment
            s.report.culprit, s.report.culprit_reason = owner, (
                f"its {what} could not be recovered from {len(shares)} shares in round "
                f"{s.server_round} (its commitment or the shares it dealt are bad)")
            self._fail(s, f"node {owner}'s {what} cannot be recovered: {error} (its commitment "
                          "or the shares it dealt are bad)")
        for holder in tampered:
            s.report.tampered.setdefault(holder, []).append(owner)
        return secret

    @staticmethod
    def _stand_in(reply: Message, records: Mapping[str, ArrayRecord]) -> Message:
        """``reply`` with its masked vector replaced by the cohort's mean records."""
        content = RecordDict({name: record for name, record in reply.content.items()
                              if name not in (protocol.SECAGG, protocol.SECAGG_MASKED)})
        for name, record in records.items():
            content[name] = record
        return Message(content, dst_node_id=reply.metadata.src_node_id,
                       message_type=MessageType.TRAIN)

    # --- evaluation is the wrapped strategy's ---

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()


def report_metrics(report: RoundReport) -> MetricRecord:
    """The train metrics a round of the protocol adds (strategy_metrics.jsonl)."""
    return MetricRecord({
        protocol.SECAGG_SURVIVORS: len(report.survivors),
        protocol.SECAGG_DROPPED: len(report.dropped),
        protocol.SECAGG_FAILED: int(bool(report.failed)),
        protocol.SECAGG_SERVER_S: report.server_s,
        **report.metrics})


def _share_keys_problem(record: ConfigRecord, peers: list[int]) -> str:
    """Why a share-keys reply cannot be forwarded ("" = it can): shares for exactly the named
    peers, each of the sealed form, a 32-byte commitment, two key commitments per peer."""
    destinations = list(record.get(protocol.SA_PEERS, []))
    columns = [list(record.get(key, [])) for key in (
        protocol.SA_CIPHERTEXTS, protocol.SA_SEAL_OUT, protocol.SA_SEAL_IN)]
    if sorted(int(d) for d in destinations if str(d).isdigit()) != peers or any(
            len(column) != len(destinations) for column in columns):
        return "shares or key commitments for other peers than named"
    commitment = record.get(protocol.SA_COMMITMENT)
    if not isinstance(commitment, bytes) or len(commitment) != keys.COMMITMENT_BYTES:
        return f"a commitment that is not {keys.COMMITMENT_BYTES} bytes"
    if not all(map(keys.is_sealed_form, columns[0])):
        return "a sealed share of the wrong form (its receiver could not open it)"
    if not all(isinstance(c, bytes) and len(c) == keys.COMMITMENT_BYTES
               for c in columns[1] + columns[2]):
        return f"a key commitment that is not {keys.COMMITMENT_BYTES} bytes"
    return ""


Refusal = tuple[int, bytes, bytes]  # (source, revealed key, the share as it arrived)


def _refusals(record: ConfigRecord, pairs: list[int]) -> tuple[list[Refusal], str]:
    """(source, revealed key, share as received) of every forwarded share a masked-input reply
    says did not open, and why the refusal itself is malformed ("" = it is not)."""
    refused = list(record.get(protocol.SA_REFUSED, []))
    revealed = list(record.get(protocol.SA_REVEALED, []))
    received = list(record.get(protocol.SA_RECEIVED, []))
    sources = [int(r) for r in refused if str(r).isdigit()]
    if (len(sources) != len(refused) or len(revealed) != len(refused)
            or len(received) != len(refused) or len(set(sources)) != len(sources)
            or not set(sources) <= set(pairs)
            or not all(isinstance(value, bytes) for value in revealed + received)):
        return [], "a refusal of shares it was not forwarded, or without their keys"
    return list(zip(sources, revealed, received, strict=True)), ""


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        np.array_equal(array.numpy(), b[name].numpy()) for name, array in a.items())
