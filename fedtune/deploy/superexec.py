"""The server side of the trust rule: a SuperExec that starts only ServerApps the publisher signed.

A Flower 1.41 SuperLink runs whatever ServerApp a ``flwr run`` hands it: the Control API has
no caller authentication in the open-source build, so anyone who can reach the SuperLink's
port with its ``ca.crt`` could run code on the server machine. With ``--isolation process``
the SuperLink starts no ServerApp itself; a separate SuperExec asks it for tasks (over the
Runtime API, guarded by ``--superexec-auth-secret-file`` so no stranger can take tasks) and
launches them. ``fedtune superexec`` is Flower's SuperExec whose plugin first checks the task's
FAB hash against the FABs in the federation's registry folder that a trusted key signed
(``fedtune.deploy.signing``); any other task is refused, so the stranger's ServerApp never
starts. Runtime dependency installation stays off.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import ERROR
from pathlib import Path

from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin import AutoExecPlugin

from fedtune.deploy.signing import (
    AcceptPolicy,
    accepted_fab_hashes,
    read_allow_list,
    read_trusted_entities,
    signed_fab_hashes,
)


def signed_apps_only(registry: Path, trusted: Mapping[str, str],
                     policy: AcceptPolicy | None = None,
                     allow_list: Path | None = None) -> type[AutoExecPlugin]:
    """Flower's SuperExec plugin, refusing every task whose FAB a trusted key did not sign, or
    whose version the operator no longer accepts (``policy``; ``allow_list``: a file read
    again for every task, so an edit takes effect at the next run)."""

    def accepted() -> set[str]:
        current = policy or AcceptPolicy()
        if allow_list is not None:
            current = AcceptPolicy(allow=read_allow_list(allow_list))
        return accepted_fab_hashes(registry, trusted, current)

    class SignedAppsOnly(AutoExecPlugin):
        def launch_task(self, token: str, task: Task) -> LaunchResult:
            fab_hash = task.fab_hash if task.HasField("fab_hash") else ""
            if not fab_hash or fab_hash not in signed_fab_hashes(registry, trusted):
                log(ERROR, "fedtune: refused task %d of run %d: its app (FAB %s) is not "
                           "signed by a trusted publisher key", task.task_id, task.run_id,
                    fab_hash[:12] or "unknown")
                return LaunchResult.failed("the app is not signed by a trusted publisher key")
            if fab_hash not in accepted():
                log(ERROR, "fedtune: refused task %d of run %d: its app (FAB %s) is signed but "
                           "retired (not the newest version, or not on the allow-list, or "
                           "expired)", task.task_id, task.run_id, fab_hash[:12])
                return LaunchResult.failed("the app version is signed but not accepted any "
                                           "more: retired by the operator")
            return super().launch_task(token, task)

    return SignedAppsOnly


def run_signed_superexec(runtime_api_address: str, root_certificates: str | None,
                         registry: Path, trusted_entities: Path,
                         secret_file: str | None, accept: str = "newest",
                         allow_list: Path | None = None) -> None:
    """Run Flower's SuperExec with ``signed_apps_only`` as its plugin (until stopped):
    ``accept`` "newest" (each app's highest signed version) or "signed" (every one);
    ``allow_list`` replaces both with the versions a file lists, until their expiry."""
    trusted = read_trusted_entities(trusted_entities)
    if allow_list is not None:
        read_allow_list(allow_list)  # a broken file is told now, not at the first run
    # Flower 1.41's SuperExec builds its plugin from this module-level name and offers no
    # option to choose another, so the plugin is swapped here.
    superexec_module.AutoExecPlugin = signed_apps_only(
        Path(registry), trusted, AcceptPolicy(newest_only=accept == "newest"), allow_list)
    superexec_module.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=root_certificates is None,
        root_certificates_path=root_certificates,
        superexec_auth_secret=load_superexec_auth_secret(secret_file),
        runtime_dependency_install=False,
    )
