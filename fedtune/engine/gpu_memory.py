"""A Ray actor's GPU memory cap: the declared share of a GPU, enforced.

Ray's fractional ``num_gpus`` (``engine.client_gpus = 0.25``: four actors on one GPU) only
throttles scheduling; nothing stops one actor from taking the whole GPU's memory, so one large
client crashes its neighbours with out-of-memory errors (the most reported pain on Flower's
tracker). Here each actor that holds a GPU share caps its own CUDA caching allocator with
``torch.cuda.set_per_process_memory_fraction`` at ``engine.client_gpu_memory_mb`` (0: the
declared share of the GPU's memory). A client whose peak passes the cap gets torch's
``OutOfMemoryError`` inside its own process; ``explained`` turns that into one line that names
the cap and what to change, the client is reported failed, and the round goes on.
"""

from __future__ import annotations

import torch

from fedtune.errors import ConfigError

MIB = 2**20
_cap_mib: float | None = None  # the cap this process set (None: no cap here)


class GpuMemoryCapExceeded(RuntimeError):
    """A client's GPU memory peak passed its actor's cap."""


def memory_fraction(share: float, cap_mb: int, total_bytes: int) -> float:
    """The fraction of a GPU of ``total_bytes`` that an actor with GPU share ``share``
    (``engine.client_gpus``) may allocate: ``cap_mb`` MiB, or the share when it is 0. A cap
    above the share would let the actors that share the GPU run it out of memory together."""
    total_mib = total_bytes / MIB
    share_mib = min(share, 1.0) * total_mib
    if cap_mb == 0:
        return min(share, 1.0)
    if cap_mb > share_mib * (1 + 1e-9):
        raise ConfigError(
            f"engine.client_gpu_memory_mb = {cap_mb} is not allowed here: must be at most "
            f"{share_mib:.0f}, engine.client_gpus = {share:g} of this GPU's {total_mib:.0f} MiB "
            "(a larger cap lets the actors that share the GPU run it out of memory together); "
            "lower it or raise engine.client_gpus")
    return cap_mb / total_mib


def cap_gpu_memory(share: float, cap_mb: int) -> float | None:
    """Cap this process's CUDA allocator on its (first visible) GPU; the cap in MiB, or None
    where there is no CUDA (Ray's logical GPUs on a machine without one)."""
    global _cap_mib
    if share <= 0 or not torch.cuda.is_available():
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = memory_fraction(share, cap_mb, total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    _cap_mib = fraction * total / MIB
    return _cap_mib


def explained(error: BaseException, cap_mib: float | None = None) -> BaseException:
    """``error``, or - a CUDA out-of-memory error in a process with a cap - a one-line
    ``GpuMemoryCapExceeded`` that names the cap (``cap_mib``: this process's by default)."""
    cap = _cap_mib if cap_mib is None else cap_mib
    if cap is None or not isinstance(error, torch.OutOfMemoryError):
        return error
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed client's blocks go back before the next client
    return GpuMemoryCapExceeded(
        f"the client's GPU memory peak passed this actor's cap of {cap:.0f} MiB "
        "(engine.client_gpu_memory_mb; 0 = the engine.client_gpus share of the GPU): lower "
        "client.batch_size, set client.precision = 'bf16', or raise the cap")
