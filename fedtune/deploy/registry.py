"""The federation's own app registry: what the SuperLink asks for a signed app.

A Flower 1.41 SuperLink fetches an app named like ``@publisher/name==1.0.0`` from the app
registry at ``FLWR_SUPERGRID_API_URL`` (Flower Hub by default): ``POST <url>/hub/fetch-fab``
with ``{"app_id", "app_version", "flwr_version"}`` answers ``{"fab_url", "verifications"}``,
and the FAB is then downloaded from ``fab_url``. This server answers those two requests from a
folder that ``fedtune publish`` filled (``fedtune.deploy.signing``), so a federation runs only
apps its publisher signed, without Flower Hub and without internet access.

Start it on the SuperLink's machine, bound to 127.0.0.1 (the SuperLink is its only client),
and start the SuperLink with ``FLWR_SUPERGRID_API_URL=http://127.0.0.1:<port>/v1``. The
standard library's HTTP server is enough for one client asking once per run.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from flwr.supercore.constant import APP_ID_PATTERN, APP_VERSION_PATTERN

from fedtune.deploy.signing import app_files

FETCH_PATH = "/v1/hub/fetch-fab"
FAB_PREFIX = "/fab/"


def valid_app_id(app_id: str) -> bool:
    """Flower's app id pattern, and no component a path could climb out with."""
    return bool(re.match(APP_ID_PATTERN, app_id)) and not any(
        part.startswith(".") for part in app_id.removeprefix("@").split("/"))


def latest_version(registry: Path, app_id: str) -> str | None:
    """The highest version of ``app_id`` in ``registry`` (None: none)."""
    fab, _ = app_files(registry, app_id, "0.0.0")
    versions = [p.stem for p in fab.parent.glob("*.fab") if re.match(APP_VERSION_PATTERN, p.stem)]
    return max(versions, key=lambda v: tuple(map(int, v.split(".")))) if versions else None


class RegistryHandler(BaseHTTPRequestHandler):
    """Answers fetch-fab requests and FAB downloads from ``server.registry``."""

    server: RegistryServer

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def do_POST(self) -> None:  # noqa: N802 - the http.server name
        if self.path != FETCH_PATH:
            self._json(404, {"detail": "unknown path"})
            return
        try:
            length = min(int(self.headers.get("Content-Length", "0")), 1 << 16)
            request = json.loads(self.rfile.read(length))
            app_id = str(request["app_id"])
            version = request.get("app_version") or latest_version(self.server.registry, app_id)
        except (ValueError, KeyError, TypeError):
            self._json(400, {"detail": "expected {app_id, app_version}"})
            return
        if not valid_app_id(app_id) or not version \
                or not re.match(APP_VERSION_PATTERN, str(version)):
            self._json(404, {"detail": f"{app_id} is not in this registry"})
            return
        fab, signatures = app_files(self.server.registry, app_id, str(version))
        if not fab.is_file() or not signatures.is_file():
            self._json(404, {"detail": f"{app_id}=={version} is not in this registry"})
            return
        host, port = self.server.server_address[:2]
        self._json(200, {
            "fab_url": f"http://{host}:{port}{FAB_PREFIX}{app_id.removeprefix('@')}/{version}",
            "verifications": json.loads(signatures.read_text(encoding="utf-8"))})

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        parts = self.path.removeprefix(FAB_PREFIX).split("/")
        if not self.path.startswith(FAB_PREFIX) or len(parts) != 3:
            self._json(404, {"detail": "unknown path"})
            return
        app_id, version = f"@{parts[0]}/{parts[1]}", parts[2]
        if not valid_app_id(app_id) or not re.match(APP_VERSION_PATTERN, version):
            self._json(404, {"detail": "unknown app"})
            return
        fab, _ = app_files(self.server.registry, app_id, version)
        if not fab.is_file():
            self._json(404, {"detail": "unknown app"})
            return
        self._send(200, fab.read_bytes(), "application/octet-stream")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        self.server.log(f"{self.address_string()} {format % args}")


class RegistryServer(ThreadingHTTPServer):
    """An HTTP server over a registry folder."""

    def __init__(self, registry: Path, host: str = "127.0.0.1", port: int = 0,
                 log=print) -> None:
        super().__init__((host, port), RegistryHandler)
        self.registry = Path(registry)
        self.log = log

    @property
    def url(self) -> str:
        """What the SuperLink's ``FLWR_SUPERGRID_API_URL`` must be."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread
