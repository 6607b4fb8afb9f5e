"""Counter-based random numbers on tensors, as JAX draws them: a key is an ``int64`` tensor, and
every draw is a pure function of the key, so sampling can live inside a compiled training step
(no ``torch.Generator`` object, no host work) with its state carried in the step's state.

A key is a 0-d ``int64`` tensor. ``split(key, n)`` gives ``n`` independent keys; ``uniform(key,
shape)`` gives floats in ``[0, 1)``, the same on every device and in every dtype up to rounding
(drawn in float64, then cast). Word ``i`` of a key is splitmix64's finaliser (Steele, Lea &
Flood 2014, Java's ``SplittableRandom``) applied twice to ``key + i``, computed in ``int64``
with wrap-around multiplication and logical shifts written as masked arithmetic shifts (a
counter times a 64-bit constant would become an index expression inductor cannot print).

Example::

    key = keys.key(0)
    key, draw = keys.split(key, 2)
    u = keys.uniform(draw, (25, 10))
"""

from __future__ import annotations

import torch

__all__ = ["key", "split", "uniform"]


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def key(seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The key of ``seed`` (an int), on ``device``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"keys.key(seed): seed must be an int, got {type(seed).__qualname__}.")
    return _mix(torch.tensor(_signed(seed % (1 << 64)), dtype=torch.int64, device=device))


def _stream(key: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` mixed 64-bit words from ``key``, ``[n]``."""
    counter = torch.arange(1, n + 1, dtype=torch.int64, device=key.device)
    return _mix(_mix(key + counter))


def split(key: torch.Tensor, n: int = 2) -> torch.Tensor:
    """``n`` new keys, ``[n]`` (unpack: ``key, sub = split(key)``); none equals ``key``'s later
    draws, as the words are mixed a second time."""
    return _mix(_stream(key, n) ^ _M2)


def uniform(
    key: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Floats uniform in ``[low, high)`` of ``shape`` from ``key`` (53 random bits each)."""
    n = 1
    for s in shape:
        n *= s
    u = _shr(_stream(key, n), 11).to(torch.float64) * 2.0**-53
    return (low + (high - low) * u).to(dtype).reshape(shape)
