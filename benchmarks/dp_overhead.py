"""DP-SGD overhead: time per local step and peak memory, non-DP vs Opacus (hooks, ghost).

The same model, optimizer (AdamW) and batch for every mode; DP adds per-example clipping
(``max_grad_norm`` 1.0) and noise (multiplier 1.0). Each mode runs in its own subprocess so
peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``, on CPU the peak resident
set size (Linux VmHWM, reset through /proc/self/clear_refs once model and batch are built)
above the resident size at that moment. Prints one table with ratios to non-DP.

    python benchmarks/dp_overhead.py                      # MiniLM (fedtune's model), CPU
    python benchmarks/dp_overhead.py --model bert-base    # BERT-base random init, batch 32,
                                                          # length 128: meant for a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODES = ("nondp", "hooks", "ghost")
PRESETS = {  # model: (batch, length)
    "minilm": (16, 48),
    "bert-base": (32, 128),
}


def build(model_name: str):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if model_name == "bert-base":
        config = BertConfig(num_labels=2)  # 12 layers x 768, vocab 30522, 110M parameters
        return BertForSequenceClassification(config), config.vocab_size
    from fedtune.models.hf import default_model_path, load_hf_classifier

    model = load_hf_classifier(default_model_path(), 2, "auto", 0.1)  # MiniLM, mean pooling
    return model, model.encoder.config.vocab_size


def measure(model_name: str, mode: str, batch: int, length: int, steps: int, warmup: int,
            device_name: str) -> dict:
    """Time per step and peak memory of one mode (run in a fresh process)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    device = torch.device(device_name)
    model, vocab = build(model_name)
    model.to(device).train()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, vocab, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        # per-example contiguous positions: Opacus needs them for BERT's embeddings
        "position_ids": torch.arange(length).repeat(batch, 1),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    labels = torch.randint(0, 2, (batch,), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    criterion = nn.CrossEntropyLoss()
    if mode != "nondp":
        from opacus import PrivacyEngine

        loader = DataLoader(TensorDataset(torch.zeros(batch * 4, 1)), batch_size=batch)
        wrapped = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
            grad_sample_mode=mode)
        model, optimizer = wrapped[0], wrapped[1]
        criterion = wrapped[2] if mode == "ghost" else criterion

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        criterion(logits, labels).backward()
        optimizer.step()

    cuda = device.type == "cuda"
    base_rss = _reset_peak_rss()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (_status_kib("VmHWM") - base_rss) / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "ms_per_step": seconds * 1000, "peak_mib": peak,
            "params_m": params / 1e6, "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="minilm")
    parser.add_argument("--batch", type=int, help="default: 16 (minilm), 32 (bert-base)")
    parser.add_argument("--length", type=int, help="default: 48 (minilm), 128 (bert-base)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode
    args = parser.parse_args()
    batch = args.batch or PRESETS[args.model][0]
    length = args.length or PRESETS[args.model][1]
    if args.one:
        print(json.dumps(measure(args.model, args.one, batch, length, args.steps, args.warmup,
                                 args.device)))
        return
    results = []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--model", args.model, "--batch", str(batch),
                   "--length", str(length), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--device", args.device, "--one", mode]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode:
            print(f"{mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r for r in results if r["mode"] == "nondp"), None)
    print(f"{args.model}, batch {batch}, length {length}, device {args.device}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, "
          f"{results[0]['torch_threads'] if results else '?'} torch threads")
    print(f"{'mode':>6} {'ms/step':>9} {'x time':>7} {'peak MiB':>9} {'x memory':>9}")
    for r in results:
        time_ratio = r["ms_per_step"] / base["ms_per_step"] if base else float("nan")
        memory_ratio = r["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 \
            else float("nan")
        print(f"{r['mode']:>6} {r['ms_per_step']:9.1f} {time_ratio:7.2f} {r['peak_mib']:9.0f} "
              f"{memory_ratio:9.2f}")


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak resident size to the current one (Linux >= 4.0); returns it in KiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    return _status_kib("VmRSS")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
