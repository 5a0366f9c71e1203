"""docs/tutorial: the rendered notebook holds the source's cells, and the source runs top to
bottom (as a newcomer would run it) with the results it describes."""

from __future__ import annotations

import re

import jupytext
import nbformat
import pytest

from tests.conftest import REPO

SOURCE = REPO / "docs" / "tutorial.py"
RENDERED = REPO / "docs" / "tutorial.ipynb"


def _cells(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_rendered_notebook_has_the_source_cells_and_their_outputs():
    rendered = nbformat.read(RENDERED, as_version=4)
    assert _cells(rendered) == _cells(jupytext.read(SOURCE)), (
        "docs/tutorial.ipynb is stale: python scripts/render_tutorial.py")
    code = [cell for cell in rendered.cells if cell.cell_type == "code"]
    assert all(cell.outputs or "import" in cell.source for cell in code)


@pytest.mark.slow
def test_tutorial_runs_top_to_bottom(tmp_path):
    from scripts.render_tutorial import execute

    notebook = execute(tmp_path, timeout=600)
    text = "\n".join(output.get("text", "") for cell in notebook.cells
                     if cell.cell_type == "code" for output in cell.outputs)
    assert "error" not in {o.output_type for c in notebook.cells for o in c.get("outputs", [])}
    ratio = int(re.search(r"\((\d+)x fewer\)", text).group(1))
    assert ratio > 100  # LoRA's adapters and head against MiniLM's 22.7M weights
    iid, skewed = map(float, re.search(r"IID ([0-9.]+), Dirichlet 0.1 ([0-9.]+)", text).groups())
    assert iid > 0.8 and iid > skewed
    spent = float(re.search(r"with local DP at ε = 2: 0\.\d+ \(ε spent ([0-9.]+)\)",
                            text).group(1))
    assert 0 < spent <= 2
    labels = re.findall(r"^ *(fresh|rotten) \(0\.\d\d\)  ", text, flags=re.M)
    assert len(labels) == 6 and labels[:3] == labels[3:]  # fedtune's loader == pipeline
    assert (tmp_path / "tutorial-runs" / "minilm-full" / "model" / "config.json").is_file()
