"""Shared test set-up: offline, no telemetry, small configs."""

from __future__ import annotations

import csv
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# a Ray started without an address (these tests' own ray.init, `flwr run`'s local simulation)
# is the test's own: never a cluster that another test (tests/integration/test_ray_cluster.py,
# on another pytest-xdist worker) has running with its address in /tmp/ray
os.environ["RAY_ADDRESS"] = "local"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedtune.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

MLP_DIGITS = [
    "data.dataset=digits", "model.kind=mlp", "model.hidden_sizes=[32]", "data.num_clients=4",
    "data.partitioner=iid", "run.rounds=2", "client.lr=0.01", "client.optimizer=adamw",
    "client.local_steps=5", "client.batch_size=32", "engine.backend=inprocess",
    "data.max_examples=0", "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
]


def tiny_config(tmp_path: Path, *overrides: str, base: list[str] = MLP_DIGITS) -> Config:
    """A config that runs in about a second: MLP on digits, 4 clients, 2 rounds, in process."""
    config = load_config(None, [*base, *overrides])
    if not config.run.dir:
        config.run.dir = str(tmp_path / "run")
    return config


def rows_of(path: Path) -> list[dict[str, str]]:
    """The rows of a run directory's CSV file."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def mlp_config(tmp_path: Path) -> Config:
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer random BERT with MiniLM's tokenizer, saved like a local HF model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.models.hf import default_model_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    threads slow them down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# the longest test files (3 to 4 minutes each, mostly waiting on a SuperLink, SuperNodes and a
# process per message): first, so that under pytest-xdist (pytest -n 2, a file whole on one
# worker) they overlap the other tests instead of running alone at the end
LONGEST_FIRST = ("tests/integration/test_deploy.py", "tests/integration/test_deploy_secagg.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = Path(str(item.path)).relative_to(REPO).as_posix()
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: every other test keeps its place
