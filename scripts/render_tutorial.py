"""Render docs/tutorial.py (jupytext's percent format, the source) to docs/tutorial.ipynb with
the outputs of a fresh run, so the notebook reads well where it is shown without running it.

    python scripts/render_tutorial.py          # about two minutes on 2 CPU cores

The notebook runs in a temporary folder (its run directories are not kept).
``tests/test_tutorial.py`` runs the same source top to bottom and checks that the rendered
notebook holds the same cells.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "docs" / "tutorial.py"
RENDERED = REPO / "docs" / "tutorial.ipynb"


def execute(folder: Path, timeout: int = 900) -> nbformat.NotebookNode:
    """The tutorial, run top to bottom with ``folder`` as its working directory."""
    notebook = jupytext.read(SOURCE)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    return notebook


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtune-tutorial-") as folder:
        notebook = execute(Path(folder))
    nbformat.write(notebook, RENDERED)
    print(f"wrote {RENDERED}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
