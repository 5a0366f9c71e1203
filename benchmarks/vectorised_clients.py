"""Clients trained one after another against ``torch.func.vmap`` over a chunk of clients.

Issue 13 asks to vectorise only where it wins: for heads on frozen features and small models,
train a chunk of K clients at once - per-client gradients of one forward/backward with
``torch.func.vmap(torch.func.grad(...))`` over stacked weights, then one fused AdamW step over the
stacked tensors (AdamW is elementwise, so a step over K stacked copies is K clients' own steps).
Both sides do only the clients' own work, from the global weights to each client's update (one
local step of batch 8, like the engine benchmark's workload): the loop side loads the global
weights into one model, steps with one reset fused AdamW and copies the update out, as
``fedtune.engine.cohort`` does; the vmap side does the same for K clients at once. Data are
random tensors of the workload's shapes (the cost does not depend on the values). Sides
alternate (A B A B), one torch thread, CPU-seconds per client, medians over ``--repeats``; the
largest difference between the two sides' per-client gradients is printed beside them.

    python benchmarks/vectorised_clients.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedtune.train import reset_optimizer

MODELS = {  # name -> (input width, layer widths): the engine workload's MLP and frozen heads
    "MLP 1024-64-2 (hashed features)": (1024, [64, 2]),
    "head 384-2 (frozen MiniLM features)": (384, [2]),
    "head 384-64-2 (frozen MiniLM features)": (384, [64, 2]),
    "head 768-2 (frozen BERT-base features)": (768, [2]),
}
BATCH = 8
LR = 0.1


def build(width: int, layers: list[int]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for out in layers:
        modules += [nn.Linear(width, out), nn.ReLU()]
        width = out
    return nn.Sequential(*modules[:-1])


def loop_side(model: nn.Sequential, inputs: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client in turn on one model and one reset fused AdamW: (updates, gradients)."""
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)
    updates = [torch.empty((len(inputs), *p.shape)) for p in params]
    grads = [torch.empty((len(inputs), *p.shape)) for p in params]
    for client in range(len(inputs)):
        with torch.no_grad():
            torch._foreach_copy_(params, start)
        reset_optimizer(optimizer)
        for p in params:
            p.grad = None
        nn.functional.cross_entropy(model(inputs[client]), labels[client]).backward()
        optimizer.step()
        for update, gradient, p in zip(updates, grads, params, strict=True):
            update[client].copy_(p.detach())
            gradient[client].copy_(p.grad)
    with torch.no_grad():
        torch._foreach_copy_(params, start)
    return flat(updates), flat(grads)


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten(1) for t in tensors], dim=1)


def vmap_side(model: nn.Sequential, inputs: torch.Tensor, labels: torch.Tensor,
              chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of clients at once: vmapped per-client gradients, one fused AdamW step:
    (updates, gradients)."""
    names = [name for name, _ in model.named_parameters()]
    start = [p.detach() for p in model.parameters()]

    def loss(params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            functional_call(model, dict(zip(names, params, strict=True)), (x,)), y)

    per_client_grads = vmap(grad(loss), in_dims=(None, 0, 0))
    updates, gradients = [], []
    for first in range(0, len(inputs), chunk):
        x, y = inputs[first:first + chunk], labels[first:first + chunk]
        stacked = [p.expand(len(x), *p.shape).clone().requires_grad_() for p in start]
        grads = per_client_grads(tuple(start), x, y)
        for p, g in zip(stacked, grads, strict=True):
            p.grad = g
        torch.optim.AdamW(stacked, lr=LR, fused=True).step()
        updates.append(flat(stacked))
        gradients.append(flat(list(grads)))
    return torch.cat(updates), torch.cat(gradients)


def cpu_per_client(run, clients: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    started = time.process_time()
    result = run()
    return 1000 * (time.process_time() - started) / clients, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=512)
    parser.add_argument("--chunks", default="8,32,128")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{args.clients} clients, one step of batch {BATCH} each, 1 torch thread, CPU-ms per "
          f"client (median of {args.repeats} alternated repeats)")
    print("| model | loop | " + " | ".join(f"vmap, chunks of {c}" for c in chunks)
          + " | largest gradient difference |")
    print("|---|---|" + "---|" * len(chunks) + "---|")
    for name, (width, layers) in MODELS.items():
        torch.manual_seed(0)
        model = build(width, layers)
        inputs = torch.randn(args.clients, BATCH, width)
        labels = torch.randint(0, layers[-1], (args.clients, BATCH))
        times: dict[str, list[float]] = {"loop": [], **{str(c): [] for c in chunks}}
        loop_side(model, inputs[:2], labels[:2])  # warm-up (the fused optimizer's first use)
        difference = 0.0
        for _ in range(args.repeats):
            ms, reference = cpu_per_client(lambda: loop_side(model, inputs, labels), args.clients)
            times["loop"].append(ms)
            for chunk in chunks:
                ms, result = cpu_per_client(lambda c=chunk: vmap_side(model, inputs, labels, c),
                                            args.clients)
                times[str(chunk)].append(ms)
                # gradients: AdamW's first step, g / (|g| + eps), magnifies rounding where g ~ 0
                difference = max(difference, float((result[1] - reference[1]).abs().max()))
        cells = [f"{statistics.median(times[key]):.3f}" for key in times]
        print(f"| {name} | " + " | ".join(cells) + f" | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
