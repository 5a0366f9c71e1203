"""Each client's own dropout masks for clients trained together (``fedtune.client.vectorised``).

One client at a time, a client's dropout draws its masks from torch's default generator, seeded
with the client's round seed (``fedtune.task.seed_torch``): ``bernoulli_(1 - p)`` on a tensor
shaped as the layer's input, scaled by ``1 / (1 - p)`` (``torch.nn.functional.dropout`` on CPU),
layer after layer, step after step; a DataLoader also draws its base seed from that generator
at the start of every epoch (``SampledRows``' ``epoch_draws``). ``torch.func.vmap`` cannot draw
those masks (its random draws are one call for the whole stack), so here each client keeps a
generator seeded as its own default generator would be and draws the same tensors in the same
order; the dropout layers run as the identity and a forward hook multiplies their output by the
client's mask (an input of the vmapped step, so each client gets its own row). Clients trained
together then drop the units the one-at-a-time path drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def dropout_layers(model: nn.Module) -> list[nn.Dropout]:
    """The model's dropout layers that drop anything (p > 0)."""
    return [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]


class ClientMasks:
    """The dropout masks of a group of clients trained together, step by step."""

    def __init__(self, model: nn.Module, generators: Sequence[torch.Generator],
                 epoch_draws: Sequence[int], epoch_batches: Sequence[int]) -> None:
        """``generators``: each client's, seeded with its round seed; ``epoch_draws``: how many
        values its loader draws from the default generator at the start of an epoch;
        ``epoch_batches``: its loader's batches per epoch."""
        self.model = model
        self.layers = dropout_layers(model)
        self.generators = list(generators)
        self.epoch_draws = list(epoch_draws)
        self.epoch_batches = list(epoch_batches)
        self.shapes: list[torch.Size] = []
        self.current: tuple[torch.Tensor, ...] = ()

    @classmethod
    def seeded(cls, model: nn.Module, seeds: Sequence[int], epoch_draws: Sequence[int],
               epoch_batches: Sequence[int]) -> ClientMasks:
        """The masks of clients whose generators are seeded with ``seeds`` (``generators``)."""
        return cls(model, cls.generators(model, seeds) or [], epoch_draws, epoch_batches)

    @staticmethod
    def generators(model: nn.Module, seeds: Sequence[int]) -> list[torch.Generator] | None:
        """A generator per client, seeded with its seed, where the model drops anything (None:
        it drops nothing; a torch generator and its seeding cost ~2.5 us a client, which a
        model without dropout never draws from). A client trained in several passes
        (``fedtune.train.TrainPass``) keeps drawing on its own, as one client's default
        generator goes on from pass to pass."""
        if not dropout_layers(model):
            return None
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def probe(self, inputs: dict[str, torch.Tensor]) -> None:
        """Learn each dropout layer's input shape (past the batch) from one example."""
        shapes: list[torch.Size] = []
        self.current = ()  # the layers pass their input through
        hooks = [layer.register_forward_pre_hook(
            lambda _, args: shapes.append(args[0].shape[1:])) for layer in self.layers]
        try:
            with torch.no_grad():
                self.model(**{key: value[0, :1] for key, value in inputs.items()})
        finally:
            for hook in hooks:
                hook.remove()
        self.shapes = shapes

    def draw(self, step: int, counts: Sequence[int], width: int) -> tuple[torch.Tensor, ...]:
        """Every layer's masks at ``step`` (clients x ``width`` x the layer's input): client k's
        first ``counts[k]`` rows as its own default generator would give them."""
        masks = [torch.ones(len(counts), width, *shape) for shape in self.shapes]
        for k, generator in enumerate(self.generators):
            if self.epoch_draws[k] and step % self.epoch_batches[k] == 0:
                for _ in range(self.epoch_draws[k]):
                    torch.empty((), dtype=torch.int64).random_(generator=generator)
            for layer, shape, mask in zip(self.layers, self.shapes, masks, strict=True):
                keep = 1 - layer.p
                mask[k, :counts[k]] = torch.empty(int(counts[k]), *shape).bernoulli_(
                    keep, generator=generator).div_(keep)
        return tuple(masks)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within this block the dropout layers multiply by ``current`` (set by the step
        function inside vmap) instead of drawing."""
        modes = [layer.training for layer in self.layers]
        hooks = [layer.register_forward_hook(
            lambda _, args, out, j=j: out * self.current[j] if self.current else out)
            for j, layer in enumerate(self.layers)]
        for layer in self.layers:
            layer.eval()
        try:
            yield
        finally:
            self.current = ()
            for hook in hooks:
                hook.remove()
            for layer, mode in zip(self.layers, modes, strict=True):
                layer.train(mode)
