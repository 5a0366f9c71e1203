"""Randomness a differential-privacy mechanism must keep secret: its noise and its sampling.

A DP guarantee holds only against someone who cannot predict the mechanism's random draws. A
generator seeded from the run's seed fails that test: the seed is in every run directory and in
the run config every client receives, so anyone holding it regenerates the noise and subtracts
it from the release. A generator seeded from OS entropy but whose algorithm is not
cryptographic (NumPy's PCG64, torch's Mersenne Twister) fails it in principle too: its state can
be recovered from enough outputs.

``SecureRandom`` draws every value from ChaCha20 (RFC 8439, through ``cryptography``, i.e.
OpenSSL) keyed with 32 fresh bytes of ``os.urandom`` *per call*. It keeps no state: nothing of
it can end up in a checkpoint, and a resumed run simply draws fresh noise for the rounds it
still plays (the noise of a finished round is already inside the released model, so it is never
needed again). It offers the two methods of ``numpy.random.Generator`` the mechanisms use,
``random`` and ``normal``, so a mechanism takes either it or a seeded NumPy generator (the
explicitly insecure, reproducible mode, ``privacy.insecure_reproducible_noise``).

The transform, written by hand because no maintained library draws Gaussians from a
cryptographic stream (Opacus' ``secure_mode`` needs torchcsprng, which is unmaintained and does
not build for current torch; NumPy's generators take only NumPy bit generators):

- uniforms: the top 53 bits of each 64-bit word, times 2^-53, so every value of [0, 1) that is a
  multiple of 2^-53 is equally likely;
- normals: Box and Muller (1958), ``sqrt(-2 ln(1 - u1)) * (cos, sin)(2 pi u2)``, exact for exact
  uniforms (the 53-bit grid truncates the tail at about 8.6 standard deviations);
- floating-point attacks (Mironov 2012, "On significance of the least significant bits for
  differential privacy"; Jin et al. 2021 and Holohan et al. 2021 for Gaussian samplers): a
  float sample is not an exact Gaussian, and the gaps in the set of values a sampler can
  produce may reveal the unnoised value. As Opacus' ``secure_mode`` does (Holohan et al. 2021,
  "Are we there yet? Timing and floating-point attacks on differential privacy systems",
  section 5.1, n = 2), each value is the sum of four Box-Muller normals divided by two, which
  makes that search cost about 2^159 instead of 2^53. This is a mitigation, not a proof: a
  formally exact release would need discrete noise (Canonne, Kamath, Steinke 2020) and
  integer arithmetic throughout.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SOURCE = ("ChaCha20 keyed by os.urandom per draw (cryptography/OpenSSL); Gaussian = sum of 4 "
          "Box-Muller normals / 2 (Holohan et al. 2021)")
INSECURE_SOURCE = ("NOT PRIVATE: NumPy/torch generators seeded from run.seed "
                   "(privacy.insecure_reproducible_noise = true): anyone with the run's config "
                   "can rebuild and remove the noise")
_CHUNK = 1 << 18  # values drawn per ChaCha20 stream (bounds the memory of one call)
_SUMMED = 4  # normals summed per value (Holohan et al. 2021: 2n with n = 2)


def _size(size: int | Sequence[int] | None) -> tuple[int, tuple[int, ...]]:
    shape = () if size is None else (size,) if isinstance(size, int) else tuple(size)
    return math.prod(shape), shape


def secure_words(count: int) -> np.ndarray:
    """``count`` uniform 64-bit words from a ChaCha20 stream under a fresh OS-entropy key."""
    encryptor = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype=np.uint64)


def _uniforms(count: int) -> np.ndarray:
    return (secure_words(count) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _box_muller(count: int) -> np.ndarray:
    half = (count + 1) // 2
    u = _uniforms(2 * half)
    radius = np.sqrt(-2.0 * np.log1p(-u[:half]))  # 1 - u lies in (0, 1]: log is finite
    angle = 2.0 * np.pi * u[half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class SecureRandom:
    """Uniforms and Gaussians from a cryptographic stream keyed by OS entropy per call
    (stateless: two instances, or two calls, never share a key)."""

    def random(self, size: int | Sequence[int] | None = None) -> np.ndarray:
        """Uniforms on [0, 1), as ``numpy.random.Generator.random``."""
        count, shape = _size(size)
        return _uniforms(count).reshape(shape)

    def standard_normal(self, size: int | Sequence[int] | None = None) -> np.ndarray:
        count, shape = _size(size)
        out = np.empty(count, dtype=np.float64)
        for start in range(0, count, _CHUNK):
            stop = min(count, start + _CHUNK)
            out[start:stop] = _box_muller(_SUMMED * (stop - start)).reshape(
                _SUMMED, stop - start).sum(axis=0) / math.sqrt(_SUMMED)
        return out.reshape(shape)

    def normal(self, loc: float = 0.0, scale: float = 1.0,
               size: int | Sequence[int] | None = None) -> np.ndarray:
        """Gaussians, as ``numpy.random.Generator.normal``."""
        return loc + scale * self.standard_normal(size)

    def __repr__(self) -> str:
        return "SecureRandom()"
