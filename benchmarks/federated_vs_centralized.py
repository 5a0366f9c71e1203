"""Federated vs centralized training throughput: the same model on the same samples, one run.

The federated side is fedtune's Flower Ray simulation: N clients share the accelerator
(``engine.client_gpus = 1/N`` on CUDA) and all of them train every round. Its throughput is the
examples the clients trained on in rounds 2..R divided by the wall time of those rounds (round
1 also starts the Ray workers and loads the models). Each round's time includes everything a
federation pays for: sending the model down and the updates up, aggregation, and the server's
evaluation on a small global test set (2% of the data).

The centralized side then trains one fresh copy of the same model in this process on exactly
the batches the sampled clients trained on in those rounds (same loaders, same seeds, same
optimizer settings), one after another; its throughput is those examples divided by its time.
The script prints both and their ratio (federated / centralized).

Models:
  minilm     all-MiniLM-L6-v2, pretrained, full fine-tune (the quickstart model, 22.7M)
  bert-base  transformers.BertConfig() defaults (12 layers, hidden 768, ~110M parameters),
             random weights (transfer = scratch: no weights are downloaded or read)
  tiny       a 2-layer, hidden-32 BERT, random weights (a CPU check that the script works)

  python benchmarks/federated_vs_centralized.py                  # CUDA: minilm and bert-base
  python benchmarks/federated_vs_centralized.py --models tiny --clients 2 --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fedtune.config import Config, load_config  # noqa: E402
from fedtune.engine.launch import launch  # noqa: E402
from fedtune.models.build import build_model  # noqa: E402
from fedtune.models.hf import default_model_path  # noqa: E402
from fedtune.task import task_resources, train_settings  # noqa: E402
from fedtune.train import train_local  # noqa: E402


def random_bert_folder(folder: Path, tiny: bool) -> str:
    """A local HF model folder holding only a BertConfig and MiniLM's (BERT) tokenizer."""
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    if tiny:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    else:
        config = BertConfig()  # BERT-base: 12 layers, hidden 768, 12 heads, vocab 30522
    config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def benchmark_config(args: argparse.Namespace, model: str, model_path: str, run_dir: Path
                     ) -> Config:
    on_cuda = torch.cuda.is_available()
    cpus = max(1, (os.cpu_count() or 1) // args.clients)
    return load_config(None, [
        f"run.dir={run_dir}", f"run.rounds={args.rounds}", f"data.num_clients={args.clients}",
        f"data.max_examples={args.max_examples}", "data.test_fraction=0.02",
        "data.partitioner=iid", f"model.path={model_path}",
        f"model.transfer={'full' if model == 'minilm' else 'scratch'}",
        f"client.local_steps={args.local_steps}", f"client.batch_size={args.batch_size}",
        f"client.precision={args.precision}", "strategy.fraction_train=1.0",
        "strategy.fraction_evaluate=0.0", "engine.backend=flower",
        f"engine.client_cpus={cpus}",
        f"engine.client_gpus={1 / args.clients if on_cuda else 0}",
    ])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, model: str, model_path: str, work: Path) -> dict:
    """Run the federation, then train centrally on the same batches; both throughputs."""
    config = benchmark_config(args, model, model_path, work / f"{model}-federated")
    launch(config)
    run_dir = Path(config.run.dir)
    timed_rounds = [r for r in _rows(run_dir / "metrics.csv") if int(r["round"]) >= 2]
    federated_s = sum(float(r["wall_s"]) for r in timed_rounds)
    trained = [(int(c["round"]), int(c["client_id"])) for c in _rows(run_dir / "clients.csv")
               if int(c["round"]) >= 2 and c["status"] == "ok"]

    resources = task_resources(config)
    central = build_model(resources.spec, config.run.seed).to(resources.device)
    settings = train_settings(config)
    loaders = [resources.client_train_loader(client, rnd) for rnd, client in trained]
    train_local(central, loaders[0], settings, resources.device)  # warm-up, not timed
    _synchronize(resources.device)
    started = time.perf_counter()
    examples = sum(train_local(central, loader, settings, resources.device).num_examples
                   for loader in loaders)
    _synchronize(resources.device)
    centralized_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in central.parameters())
    return {
        "model": model, "parameters": parameters, "clients": args.clients,
        "timed_rounds": len(timed_rounds), "examples": examples,
        "federated_s": federated_s, "centralized_s": centralized_s,
        "federated_samples_per_s": examples / federated_s,
        "centralized_samples_per_s": examples / centralized_s,
        "ratio": centralized_s / federated_s,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base" if torch.cuda.is_available()
                        else "tiny", help="comma-separated: minilm, bert-base, tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="round 1 is warm-up, not timed")
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=0, help="0 = all 12,752 texts")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is warm-up)")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        work = Path(tmp)
        for model in args.models.split(","):
            if model == "minilm":
                path = default_model_path()
            else:
                path = random_bert_folder(work / model, tiny=model == "tiny")
            results.append(measure(args, model, path, work))
    print(f"{'model':>10} {'params':>8} {'clients':>7} {'examples':>8} {'fed s':>7} "
          f"{'central s':>9} {'fed/s':>8} {'central/s':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['model']:>10} {r['parameters'] / 1e6:>7.1f}M {r['clients']:>7} "
              f"{r['examples']:>8} {r['federated_s']:>7.1f} {r['centralized_s']:>9.1f} "
              f"{r['federated_samples_per_s']:>8.1f} {r['centralized_samples_per_s']:>9.1f} "
              f"{r['ratio']:>6.2f}")
    print(f"device: {results[0]['device']}; ratio = federated samples/s / centralized samples/s")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
