"""Masked, quantised, weighted inputs of SecAgg+ (Bonawitz et al. 2017, Section 4; Bell et al.
2020, Section 3).

A client turns the records it would send - its model minus the global one, or a record that is
summed as it is, such as SCAFFOLD's control delta - into one vector of unsigned integers modulo
``2^R`` (``R`` = 32 or 64, NumPy's wrap-around does the modulo):

    y_u = W_u * Q(x_u) + PRG(b_u) + sum_{v in N(u)} ±PRG(s_uv)                  (mod 2^R)

``Q`` clips to ``[-c, c]``, maps onto the levels ``0..L`` (``L = 2^bits - 1``, Flower's mapping)
and rounds with a *subtractive dither* (Schuchman 1964; Gray and Stockham 1993, "Dithered
quantizers"): ``Q(x_u) = round(level(x_u) + d_u)`` with ``d_u`` uniform on ``[-1/2, 1/2)`` per
coordinate, drawn from a public seed (the round's graph seed and the node id) that the server
knows too; it subtracts ``sum_u W_u d_u`` after unmasking. The rounding error of each client is
then uniform on ``[-1/2, 1/2)`` level and *independent of the value* rounded, so the decoded
sum is the exact sum of the clipped values plus noise that does not depend on any client's
data. Under distributed DP that makes the quantised release a post-processing of the Gaussian
mechanism on the real-valued noised sum (fedtune.privacy.central_dp). Flower's quantiser rounds
stochastically instead (unbiased, but its error depends on the value, so the sum of rounded
values is not a function of the noised sum), which is why it is not used here; its
``dequantize`` is. ``W_u`` is the client's integer weight; ``+`` towards a larger node id and
``-`` towards a smaller one, so the pairwise masks cancel in the sum. One more coordinate counts
the values the client clipped. The server removes the survivors' self masks and the dropped
clients' pairwise masks and reads ``sum_u W_u Q(x_u)`` exactly while ``(sum_u W_u) * L < 2^R``.
Rounding moves each coordinate of the weighted mean by at most half a step, ``c / L``
(``rounding_bound``).

The PRG is AES-256 in counter mode keyed by a 32-byte seed. Flower's ``pseudo_rand_gen`` folds
its seed to 32 bits and feeds NumPy's Mersenne Twister, so a client's 2^32 possible self masks
could be tried one by one; a mask has to be a cryptographic pseudo-random stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

RING_BITS = (32, 64)
_ZERO_NONCE = bytes(16)  # each PRG key is used for one stream only


def ring_dtype(ring_bits: int) -> np.dtype:
    if ring_bits not in RING_BITS:
        raise ValueError(f"ring_bits must be one of {RING_BITS}, got {ring_bits}")
    return np.dtype(np.uint32 if ring_bits == 32 else np.uint64)


def levels(bits: int) -> int:
    """``L``: the top quantisation level (Flower's quantiser casts to int32: bits <= 30)."""
    return 2**bits - 1


def rounding_bound(clip_range: float, bits: int) -> float:
    """The largest error dithered rounding leaves in a coordinate of the weighted mean (half a
    step)."""
    return clip_range / levels(bits)


def max_total_weight(ring_bits: int, bits: int) -> int:
    """The largest sum of client weights whose weighted level sum fits the ring."""
    return (2**ring_bits - 1) // levels(bits)


def prg(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """``length`` pseudo-random ring elements from a 32-byte seed (AES-256-CTR; read-only)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize)) + encryptor.finalize()
    return np.frombuffer(stream, dtype=dtype)


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """``vector += sign * PRG(seed)`` modulo the ring, in place."""
    mask = prg(seed, vector.size, vector.dtype)
    if sign > 0:
        vector += mask
    else:
        vector -= mask


def pair_sign(own: int, peer: int) -> int:
    """The sign of ``own``'s pairwise mask with ``peer`` (opposite at ``peer``)."""
    return 1 if own < peer else -1


def dither_seed(graph_seed: int, node: int) -> bytes:
    """The public 32-byte seed of ``node``'s dither in the round whose neighbour graph
    ``graph_seed`` seeds (both parties know both numbers)."""
    return hashlib.sha256(b"fedtune-secagg-dither" + int(graph_seed).to_bytes(8, "big")
                          + int(node).to_bytes(8, "big")).digest()


def dither(seed: bytes, length: int) -> np.ndarray:
    """``length`` dither values, uniform on ``[-1/2, 1/2)`` (53-bit grid), from ``seed``."""
    words = prg(seed, length, np.dtype(np.uint64))
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5


def quantise(values: np.ndarray, clip_range: float, bits: int, offsets: np.ndarray
             ) -> np.ndarray:
    """Levels ``0..L`` of ``values`` clipped to ``[-c, c]`` (Flower's mapping), rounded after
    adding the dither ``offsets`` (``level + offset`` lies in ``[-1/2, L + 1/2)``, so the
    rounded level stays in ``0..L``)."""
    scale = levels(bits) / (2 * clip_range)
    exact = (np.clip(values, -clip_range, clip_range) + clip_range) * scale
    return np.clip(np.rint(exact + offsets), 0, levels(bits)).astype(np.int64)


def encode(values: np.ndarray, weight: int, clip_range: float, bits: int, dtype: np.dtype,
           offsets: np.ndarray) -> np.ndarray:
    """``[W * Q(values)..., number of clipped values]`` as ring elements (unmasked)."""
    clipped = int(np.count_nonzero(np.abs(values) > clip_range))
    encoded = np.empty(values.size + 1, dtype=dtype)
    encoded[:-1] = quantise(values, clip_range, bits, offsets).astype(dtype) * dtype.type(weight)
    encoded[-1] = min(clipped, 2**(8 * dtype.itemsize) - 1)
    return encoded


def decode_mean(total: np.ndarray, total_weight: int, clip_range: float, bits: int,
                dither_sum: np.ndarray) -> tuple[np.ndarray, int]:
    """(weighted mean of the clients' values, clipped values over all clients) from the unmasked
    sum of their encodings and the weighted sum of their dithers; exact integer division
    first, so no precision is lost above 2^53."""
    levels_sum = total[:-1].astype(np.uint64)
    quotient, remainder = np.divmod(levels_sum, np.uint64(total_weight))
    mean_level = quotient.astype(np.float64) + (remainder.astype(np.float64)
                                                - dither_sum) / total_weight
    return dequantize([mean_level], clip_range, levels(bits))[0], int(total[-1])


def outside_range(total: np.ndarray, total_weight: int, bits: int, inputs: int) -> str:
    """Why the unmasked sum of ``inputs`` encodings cannot be what in-range inputs add up to
    ("" = it can): every level sum is at most ``L`` times the weights' sum (each client's
    ``W_u * Q(x_u)`` lies in ``[0, W_u L]``), the clipped count at most every value of every
    input. A masked vector of random ring elements (or one shifted by 2^62) breaks this with
    overwhelming probability; one inside the range cannot be told from an honest one."""
    most = levels(bits) * total_weight
    over = int(np.count_nonzero(total[:-1] > np.asarray(most, dtype=total.dtype)))
    if over:
        return (f"the unmasked sum is outside what {inputs} inputs in range add up to in "
                f"{over:,} of {total.size - 1:,} values (a level sum above {most:,}): a client "
                "sent a masked input outside its range (SecAgg+ hides whose)")
    if int(total[-1]) > (total.size - 1) * inputs:
        return (f"the unmasked count of clipped values, {int(total[-1]):,}, is more than the "
                f"{(total.size - 1) * inputs:,} values of {inputs} inputs: a client sent a "
                "masked input outside its range (SecAgg+ hides whose)")
    return ""


def clip_l2(values: np.ndarray, bound: float) -> bool:
    """Scale ``values`` in place to L2 norm at most ``bound`` (Flower's flat clipping); whether
    it was within the bound already."""
    if get_norm([values]) <= bound:
        return True
    clip_inputs_inplace([values], bound)
    return False


# --- which tensors enter the sum ----------------------------------------------------------------

@dataclass(frozen=True)
class SummedRecord:
    """A reply ArrayRecord that enters the sum: its name, the sent record that gives its tensor
    names and shapes, and whether it is summed relative to that record (the model) or as it is
    (SCAFFOLD's control delta, which answers the control variate)."""

    reply: str
    sent: str
    delta: bool
    # tensors of a relative record that are not summed and keep the sent values: a personalised
    # strategy's personal part, which each client keeps and never sends, even masked
    kept: tuple[str, ...] = ()


def summed_records(sent_records: Sequence[str], answers: Mapping[str, str],
                   kept: Sequence[str] = ()) -> list[SummedRecord]:
    """The summed records of a reply to a message that sent ``sent_records`` (ArrayRecords, in
    order): a sent record comes back under its own name (relative, without its ``kept``
    tensors) or as the reply record that answers it (``answers``: reply record -> sent record;
    as it is)."""
    answering = {sent: reply for reply, sent in answers.items()}
    return [SummedRecord(answering[name], name, False) if name in answering
            else SummedRecord(name, name, True, tuple(kept)) for name in sent_records]


def _floating(record: ArrayRecord, kept: Sequence[str] = ()) -> list[str]:
    return [name for name, array in record.items()
            if np.issubdtype(np.dtype(array.dtype), np.floating) and name not in kept]


def vector_length(sent: RecordDict, summed: Sequence[SummedRecord]) -> int:
    """How many values the sum holds (floating tensors only: integer buffers and a personal
    part keep the server's values)."""
    return sum(int(np.prod(sent[s.sent][name].shape, dtype=np.int64))
               for s in summed for name in _floating(sent[s.sent], s.kept))


def flatten(reply: RecordDict, sent: RecordDict, summed: Sequence[SummedRecord]) -> np.ndarray:
    """The summed values of a reply as one float64 vector; raises ``ValueError`` when a record
    or tensor is missing or has another shape."""
    parts = []
    for s in summed:
        if s.reply not in reply.array_records:
            raise ValueError(f"the reply has no ArrayRecord {s.reply!r} to sum")
        received, reference = reply[s.reply], sent[s.sent]
        for name in _floating(reference, s.kept):
            if name not in received:
                raise ValueError(f"{s.reply}.{name} is missing")
            value = received[name].numpy()
            if tuple(value.shape) != tuple(reference[name].shape):
                raise ValueError(f"{s.reply}.{name}: shape {list(value.shape)} instead of "
                                 f"{list(reference[name].shape)}")
            value = value.astype(np.float64)
            if s.delta:
                value = value - reference[name].numpy()
            parts.append(value.ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(mean: np.ndarray, sent: RecordDict, summed: Sequence[SummedRecord]
              ) -> dict[str, ArrayRecord]:
    """The reply records that ``mean`` stands for, in the sent tensors' dtypes (integer tensors
    and a personal part keep the sent values)."""
    records, position = {}, 0
    for s in summed:
        reference, arrays = sent[s.sent], {}
        floating = set(_floating(reference, s.kept))
        for name, array in reference.items():
            value = array.numpy()
            if name in floating:
                size = value.size
                part = mean[position:position + size].reshape(value.shape)
                position += size
                value = (value.astype(np.float64) + part) if s.delta else part
            arrays[name] = Array(np.asarray(value).astype(array.dtype, copy=False))
        records[s.reply] = ArrayRecord(arrays)
    return records


# --- client weights -----------------------------------------------------------------------------

RATIO_SCALE = 256  # a ratio weight ("a/b") is summed in units of 1/256


def integer_weight(expression: str, metrics: Mapping[str, object]) -> int:
    """A client's integer weight in the secure sum from its reply metrics: ``expression`` is a
    strategy's ``sum_weight`` (``fedtune.tables.strategies``): ``"1"`` (unweighted), a metric
    that holds an integer (``"num-examples"``), or a ratio ``"a/b"`` of two metrics (in units
    of ``1 / RATIO_SCALE``)."""
    if expression == "1":
        return 1
    numerator, _, denominator = expression.partition("/")
    value = float(metrics[numerator])  # type: ignore[arg-type]
    if denominator:
        divisor = float(metrics[denominator])  # type: ignore[arg-type]
        if not divisor > 0:
            raise ValueError(f"{denominator} = {divisor!r}: must be > 0")
        return max(1, round(RATIO_SCALE * value / divisor))
    if value != int(value) or value < 0:
        raise ValueError(f"{numerator} = {value!r}: must be a whole number >= 0")
    return int(value)
