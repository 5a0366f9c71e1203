"""A party's own CSV/JSONL data (data.dataset = "files"): loading, errors, a whole run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fedtune.client.app import app as client_app
from fedtune.config import ConfigError, load_config, to_run_config
from fedtune.data.files import load_party_file
from fedtune.data.sources import load_dataset
from fedtune.engine.inprocess import InProcessGrid
from fedtune.server.app import run_federated

LABELS = ("fresh", "rotten")


def _write_party_files(folder, parties=3, per_party=60, test=80):
    """Rotten Tomatoes snippets written as party files: CSV, JSONL (label index), CSV..."""
    data = load_dataset("rotten_tomatoes")
    rows = np.random.default_rng(0).permutation(len(data))
    paths, start = [], 0
    for party in range(parties + 1):
        size = test if party == parties else per_party
        chunk = rows[start:start + size]
        start += size
        if party % 2 == 1:
            path = folder / f"party{party}.jsonl"
            path.write_text("".join(json.dumps({"text": data.texts[r], "label": int(data.labels[r])})
                                    + "\n" for r in chunk))
        else:
            path = folder / f"party{party}.csv"
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["label", "text"])
                writer.writerows([LABELS[data.labels[r]], data.texts[r]] for r in chunk)
        paths.append(path)
    return paths[:-1], paths[-1]


def test_party_files_load_with_shared_label_order(tmp_path):
    parties, test = _write_party_files(tmp_path)
    csv_data = load_party_file(str(parties[0]), LABELS)
    jsonl_data = load_party_file(str(parties[1]), LABELS)
    assert len(csv_data) == len(jsonl_data) == 60
    assert csv_data.label_names == jsonl_data.label_names == LABELS
    original = load_dataset("rotten_tomatoes")
    by_text = dict(zip(original.texts, original.labels, strict=True))
    assert all(by_text[t] == y for t, y in zip(jsonl_data.texts, jsonl_data.labels, strict=True))


def test_bad_party_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,text\nfresh,good\nmaybe,odd\n")
    with pytest.raises(ConfigError, match=r"bad.csv:3: label 'maybe' is not allowed"):
        load_party_file(str(bad), LABELS)
    headless = tmp_path / "h.csv"
    headless.write_text("y,x\n1,a\n")
    with pytest.raises(ConfigError, match="the header lacks"):
        load_party_file(str(headless), LABELS)
    with pytest.raises(ConfigError, match="does not exist"):
        load_party_file(str(tmp_path / "none.jsonl"), LABELS)
    with pytest.raises(ConfigError, match="data.label_names"):
        load_config(None, ["data.dataset=files", f"data.test_path={bad}"])


def test_run_on_party_files_in_process(tmp_path):
    parties, test = _write_party_files(tmp_path)
    config = load_config(None, [
        "data.dataset=files", "data.label_names=[\"fresh\", \"rotten\"]",
        f"data.test_path={test}", "data.num_clients=3", "model.kind=mlp",
        "model.hidden_sizes=[16]", "run.rounds=2", "client.local_steps=3",
        "strategy.fraction_train=1.0", "strategy.fraction_evaluate=1.0",
        "engine.backend=inprocess", f"run.dir={tmp_path / 'run'}",
    ])
    grid = InProcessGrid(client_app, to_run_config(config), 3,
                         node_configs=[{"data-path": str(p)} for p in parties])
    run_dir = run_federated(grid, config).path
    clients = list(csv.DictReader((run_dir / "clients.csv").open()))
    assert {(c["client_id"], c["num_examples"]) for c in clients} == {
        ("0", "54"), ("1", "54"), ("2", "54")}  # 60 each, 10% held out as local test
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"]["global_test_examples"] == 80
    assert 0 <= summary["final"]["eval_accuracy"] <= 1


@pytest.mark.parametrize("name, data, message", [
    ("latin.csv", "label,text\nfresh,caf\xe9\n".encode("latin-1"),
     r"latin.csv:2: not UTF-8 text \(byte 0xe9\)"),
    ("digits.csv", "label,text\n\u0661,good\n".encode(), r"digits.csv:2: label '\u0661' is not "
                                                        "allowed"),
    ("null.jsonl", b'{"text": null, "label": "fresh"}\n', r"null.jsonl:1: text None is not "
                                                          "allowed: must be a string"),
    ("nolabel.jsonl", b'{"text": "x", "label": null}\n', r"nolabel.jsonl:1: label None is not "
                                                         "allowed"),
    ("short.csv", b"label,text\nfresh\n", r"short.csv:2: the row has fewer fields than the "
                                          "header"),
])
def test_hostile_party_files_are_one_line_errors(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=message):
        load_party_file(str(tmp_path / name), LABELS)


def test_party_files_may_start_with_a_byte_order_mark_and_hold_long_texts(tmp_path):
    long_text = "word " * 50_000  # 250,000 characters: beyond csv's default field limit
    bom = tmp_path / "bom.csv"
    bom.write_bytes(("\ufefflabel,text\nfresh,good\nrotten," + long_text + "\n").encode())
    data = load_party_file(str(bom), LABELS)
    assert data.texts == ("good", long_text) and list(data.labels) == [0, 1]


# --- issue 25, item 10: rows that merge, a test file too small to measure anything --------------

@pytest.mark.parametrize("data, message", [
    # the quote on line 3 never closes: lines 3-5 became one text, "fewer fields" on line 5
    ('label,text\nfresh,good\nrotten,"unclosed\nfresh,third\nrotten,fourth\n',
     r"q.csv:3: a quote opened on this line is never closed \(the file ends inside it\)"),
    # closed by a quote in the middle of a later text
    ('label,text\nfresh,"great film\nrotten,ok\nfresh,bad" film\n',
     r"q.csv:2: not a valid CSV record \(',' expected after '\"'\): it starts here and ends "
     r"on line 4"),
    # closed at the end of a later row: three rows merged into one, silently
    ('label,text\nfresh,"great film\nrotten,ok\nfresh,bad film"\n',
     r"q.csv:2: the quoted field that starts on this line runs to line 4 and holds 'rotten,ok',"
     r" which reads as a row of its own"),
])
def test_an_unbalanced_quote_names_the_line_it_opens_on(tmp_path, data, message):
    (tmp_path / "q.csv").write_text(data)
    with pytest.raises(ConfigError, match=message):
        load_party_file(str(tmp_path / "q.csv"), LABELS)


def test_a_quoted_text_may_still_span_lines(tmp_path):
    (tmp_path / "ok.csv").write_text('label,text\nfresh,"two\nlines, fine"\nrotten,"say ""hi"""\n')
    data = load_party_file(str(tmp_path / "ok.csv"), LABELS)
    assert data.texts == ("two\nlines, fine", 'say "hi"')


def test_a_global_test_file_of_three_rows_is_warned_about(tmp_path):
    from fedtune.config import ConfigWarning
    from fedtune.data.federation import build_federation

    (tmp_path / "test.csv").write_text("label,text\nfresh,a\nrotten,b\nfresh,c\n")
    config = load_config(None, ["data.dataset=files", 'data.label_names=["fresh", "rotten"]',
                                f"data.test_path='{tmp_path / 'test.csv'}'"])
    with pytest.warns(ConfigWarning, match=r"data.test_path = .* holds 3 examples: a test "
                                           r"accuracy on it moves in steps of 0.33"):
        federation = build_federation(config.data, 0)
    assert len(federation.test_rows) == 3
