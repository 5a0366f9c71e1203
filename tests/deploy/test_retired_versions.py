"""A superseded app version stays signed forever; the operator retires it (issue 25, item 11).

Whoever reaches the SuperLink's Control API can ``flwr run`` any version in the registry. The
server-side gate is ``fedtune superexec``'s plugin: it starts a ServerApp only for a FAB the
publisher signed *and* the operator still accepts (the newest version of each app, or an
allow-list with expiry dates); without a ServerApp no party is ever sent a message of that run.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import LaunchResult

from fedtune.config import ConfigError
from fedtune.deploy.certs import write_credentials
from fedtune.deploy.signing import (
    AcceptPolicy,
    accepted_fab_hashes,
    publish,
    read_allow_list,
    read_trusted_entities,
)
from fedtune.deploy.superexec import signed_apps_only

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tiny"
version = "{version}"

[tool.flwr.app]
publisher = "federation"

[tool.flwr.app.components]
serverapp = "tiny_app:server"
clientapp = "tiny_app:client"
"""


class RecordingExecutor:
    """Stands in for Flower's process launcher: records what it was asked to start."""

    def __init__(self) -> None:
        self.launched: list[str | None] = []

    def launch(self, spec) -> LaunchResult:
        self.launched.append(spec.fab_hash)
        return LaunchResult.accepted()


@pytest.fixture
def federation(tmp_path):
    """A registry holding versions 0.1.0 (buggy, superseded) and 0.2.0 of one app, both signed
    by the publisher key."""
    creds = write_credentials(tmp_path / "creds", ["localhost"], 1)
    registry = tmp_path / "registry"
    hashes = {}
    for version in ("0.1.0", "0.2.0"):
        app = tmp_path / f"app-{version}"
        app.mkdir()
        (app / "pyproject.toml").write_text(PYPROJECT.format(version=version))
        (app / "tiny_app.py").write_text(f"VERSION = {version!r}\n")
        hashes[version] = publish(app, registry, creds.publisher_key).fab_hash
    return registry, read_trusted_entities(creds.trusted_entities), hashes


def _launch(registry, trusted, policy, fab_hash: str) -> tuple[LaunchResult, list]:
    executor = RecordingExecutor()
    plugin = signed_apps_only(registry, trusted, policy)(
        runtime_api_address="127.0.0.1:1", insecure=True, root_certificates_path=None,
        executor=executor)
    result = plugin.launch_task("token", Task(task_id=1, run_id=7, type=TaskType.SERVER_APP,
                                              fab_hash=fab_hash))
    return result, executor.launched


def test_the_superseded_version_is_refused_by_default(federation):
    """Before: every FAB ever signed was started (the old 0.1.0 too)."""
    registry, trusted, hashes = federation
    refused, launched = _launch(registry, trusted, AcceptPolicy(), hashes["0.1.0"])
    assert refused.status == "failed" and launched == []
    assert "not accepted" in refused.message
    accepted, launched = _launch(registry, trusted, AcceptPolicy(), hashes["0.2.0"])
    assert accepted.status == "accepted" and launched == [hashes["0.2.0"]]
    # the operator may still accept every signed version, on purpose
    assert accepted_fab_hashes(registry, trusted, AcceptPolicy(newest_only=False)) == set(
        hashes.values())


def test_an_allow_list_accepts_what_it_lists_until_it_expires(federation, tmp_path):
    registry, trusted, hashes = federation
    allow = tmp_path / "allow.yaml"
    allow.write_text('"@federation/tiny==0.1.0": 2030-01-01\n"@federation/tiny==0.2.0": null\n')
    policy = AcceptPolicy(allow=read_allow_list(allow))
    before = datetime(2029, 12, 31, tzinfo=UTC)
    after = datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=1)
    assert accepted_fab_hashes(registry, trusted, policy, before) == set(hashes.values())
    assert accepted_fab_hashes(registry, trusted, policy, after) == {hashes["0.2.0"]}
    # a listed version that nobody signed is not accepted either
    unsigned = hashlib.sha256(b"not in the registry").hexdigest()
    assert unsigned not in accepted_fab_hashes(registry, trusted, policy, before)


@pytest.mark.parametrize("text, message", [
    ("- a list\n", "must map '@publisher/app==version' to an expiry date or null"),
    ('"@federation/tiny": null\n', "'@federation/tiny' is not '@publisher/app==version'"),
    ('"@federation/tiny==0.1.0": someday\n', "expiry 'someday' of '@federation/tiny==0.1.0' "
                                             "is not a date"),
])
def test_a_broken_allow_list_is_a_one_line_error(tmp_path, text, message):
    allow = tmp_path / "allow.yaml"
    allow.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        read_allow_list(allow)
