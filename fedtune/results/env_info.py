"""Versions, hardware and code revision of a run (env.json)."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("fedtune", "torch", "flwr", "ray", "opacus", "transformers", "peft", "numpy",
            "flwr-datasets", "safetensors")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@cache
def code_digest() -> str:
    """SHA-256 of the code that runs: every .py file of the fedtune and strategies packages,
    by path and content. Unlike the git sha it sees uncommitted changes and installs without
    git; a sweep compares it (with the package versions) before it reuses a finished run."""
    digest = hashlib.sha256()
    for package in ("fedtune", "strategies"):
        root = Path(__import__(package).__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """The versions of the packages a run's results depend on (env.json's ``packages``)."""
    return {name: _version(name) for name in PACKAGES}


def environment(seed: int) -> dict:
    import torch

    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "git_sha": _git_sha(),
        "code_sha256": code_digest(),
        "seed": seed,
    }
