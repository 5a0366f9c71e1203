"""``engine.ray_address = ''`` starts a Ray of the run's own, even on a machine where another
cluster's address is on record (a `ray start` writes it to <Ray's temp dir>/ray_current_cluster,
where a plain ``ray.init()`` looks first and joins it)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from fedtune.engine.shape import local_cpus
from tests.conftest import tiny_config


def test_a_local_session_joins_no_cluster_on_record(tmp_path, monkeypatch):
    import ray

    from fedtune.engine.ray_pool import ray_session

    assert not ray.is_initialized()
    # a short path: Ray's Unix sockets live under it (sun_path holds 107 bytes)
    temp_root = tempfile.mkdtemp(prefix="fedtune-ray-", dir="/tmp")
    try:
        record = Path(temp_root, "ray", "ray_current_cluster")
        record.parent.mkdir()
        record.write_text("127.0.0.1:9\n")  # another cluster's address (nothing listens)
        monkeypatch.setenv("RAY_TMPDIR", temp_root)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)  # tests/conftest.py sets it
        with ray_session(tiny_config(tmp_path, "engine.backend=ray")):
            assert ray.is_initialized()
            assert ray.cluster_resources()["CPU"] == pytest.approx(local_cpus())
            assert ray.get_runtime_context().gcs_address != "127.0.0.1:9"
        assert not ray.is_initialized()
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
