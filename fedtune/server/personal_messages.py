"""Every client's personal evaluation by messages, where its state lives with it.

On a runtime that keeps no ``ClientStateStore`` (Flower's simulation, a deployment's
SuperNodes) a client's personal head or model never reaches the server, so the server asks
every registered node, sampled or not, with one message of type
``protocol.PERSONAL_MESSAGE_TYPE`` (the global model, the round, whether to train alone too):
the client evaluates its own models on its own local test split, with model selection on its
validation split (``fedtune.client.personal.personal_metrics``), and replies metrics only.
Replies are screened (``fedtune.server.screening.check_personal_reply``); a node that fails,
times out or is rejected has no rows that round, and a log line names it.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import log

from fedtune import protocol
from fedtune.personal.evaluation import PersonalRow
from fedtune.server.exchange import exchange
from fedtune.server.round import FederatedRun
from fedtune.server.screening import check_personal_reply, reply_limits


def personal_rows_by_messages(run: FederatedRun, server_round: int, personalised: bool,
                              local_only: bool) -> list[PersonalRow]:
    """personal.csv's rows of ``server_round`` from every node's reply, in the order the
    driver's evaluation writes them (each client's global and personalised rows by client id,
    then the local-only rows)."""
    grid = run.grid
    content = RecordDict({
        protocol.ARRAYS: run.state.arrays,
        protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round,
                                       protocol.PERSONAL_LOCAL_ONLY: local_only})})
    messages = [Message(content, dst_node_id=node, message_type=protocol.PERSONAL_MESSAGE_TYPE,
                        group_id=str(server_round)) for node in grid.get_node_ids()]
    done = exchange(grid, messages, run.config.strategy.round_timeout_s,
                    lambda got, total: run.progress(server_round, "personal", got, total),
                    run.stop)
    schema = protocol.personal_reply_schema(personalised, local_only)
    limits = reply_limits(run.config, run.resources.federation)
    identities = run.identities
    answered: dict[int, dict] = {}
    problems = [f"node {node}: timeout" for node in done.timed_out]
    problems += [f"node {done.node(r)}: failed" for r in done.failed]
    for reply in done.ok:
        node = done.node(reply)
        client = identities.client_of(node)
        reason = check_personal_reply(reply, schema, limits, client)
        if reason is None and client is None:
            reason = identities.claim(node, protocol.metric(reply, protocol.PARTITION_ID))
            client = identities.client_of(node)
        if reason is None and client in answered:
            reason = f"client {client} answered twice"
        if reason is not None:
            problems.append(f"node {node}: rejected, {reason}")
            continue
        answered[client] = dict(reply.content[protocol.METRICS])
    if problems:
        log(WARNING, "fedtune: round %s personal evaluation: %s of %s clients answered; %s",
            server_round, len(answered), len(messages), "; ".join(problems[:5]))
    models = [m for m, on in zip(protocol.PERSONAL_MODELS, (True, personalised, False),
                                 strict=True) if on]
    rows = [_row(server_round, client, model, answered[client])
            for client in sorted(answered) for model in models]
    if local_only:
        rows += [_row(server_round, client, protocol.PERSONAL_MODELS[2], answered[client])
                 for client in sorted(answered)]
    return rows


def _row(server_round: int, client: int, model: str, metrics: dict) -> PersonalRow:
    examples = int(metrics[protocol.personal_metric(model, "examples")])
    if not examples:
        return PersonalRow(server_round, client, model, None, None, 0)
    return PersonalRow(server_round, client, model,
                       float(metrics[protocol.personal_metric(model, "accuracy")]),
                       float(metrics[protocol.personal_metric(model, "loss")]), examples)
