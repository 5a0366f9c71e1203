"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing
page, a bad anchor or an API docstring that does not parse fails), and every repository path
that README.md, BENCHMARKS.md and the pages name exists."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

# a path into the repository, named in running text or code: tests/..., fedtune/..., ...
REPO_PATH = re.compile(r"(?<![\w./@-])((?:tests|fedtune|simulations|scripts|benchmarks|"
                       r"strategies|docs)/[\w./*-]*[\w*])")


def _documents() -> list:
    return [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for document in _documents():
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            for path in REPO_PATH.findall(line):
                found = list(REPO.glob(path)) if "*" in path else [REPO / path]
                if not found or not all(p.exists() for p in found):
                    missing.append(f"{document.relative_to(REPO)}:{number}: {path}")
    assert missing == []


def test_the_path_check_sees_paths_in_text_code_and_tables():
    line = ("`tests/test_runtimes.py` runs it; see fedtune/server/loop.py, "
            "| simulations/*.toml | and https://example.org/tests/x.py")
    assert REPO_PATH.findall(line) == ["tests/test_runtimes.py", "fedtune/server/loop.py",
                                       "simulations/*.toml"]


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(site)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    assert "load_run" in api and "callbacks" in api  # generated from the docstrings
    assert "benchmarks/secagg_overhead.py" in (site / "benchmarks" / "index.html").read_text(
        encoding="utf-8")  # BENCHMARKS.md, included
    assert (site / "tutorial" / "index.html").is_file()  # the notebook, rendered
    for page in ("getting-started", "guide/config", "guide/run-directory", "guide/runtimes",
                 "guide/transfer-learning", "guide/privacy", "guide/secure-aggregation",
                 "guide/hostile-clients", "guide/deployment", "guide/tracking", "guide/sweeps",
                 "studies/non_iid", "studies/client_drift", "studies/privacy_utility",
                 "architecture", "privacy"):
        assert (site / page / "index.html").is_file(), page
