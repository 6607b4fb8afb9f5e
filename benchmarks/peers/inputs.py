"""The init file and the data file: written once by the driver, read by every peer.

Both are ``torch.save``d flat dicts, loaded with ``torch.load(weights_only=True)``:

- init: ``param_names(spec)`` -> tensor, in the spec's dtype. Convs and head are Xavier-uniform,
  their biases zero; batch-norm weights one, biases zero.
- data: ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (int64), ``query_x [T, N*Q, C, H,
  W]``, ``query_y [T, N*Q]``; images standard normal, labels balanced (``0..N-1`` each repeated
  ``K`` resp. ``Q`` times), the same meta-batch for every iteration.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.peers.model import param_shapes
from benchmarks.peers.spec import Spec

__all__ = ["DATA_KEYS", "load_data", "make_inputs"]

DATA_KEYS = ("support_x", "support_y", "query_x", "query_y")


def _xavier_uniform(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound


def make_inputs(spec: Spec, seed: int) -> tuple[Path, Path]:
    """Write ``spec.init_path`` and ``spec.data_path`` deterministically from ``seed``.

    Values are drawn in float64 from one CPU ``torch.Generator`` and cast to ``spec.dtype``, so the
    float32 and float64 files of a setting hold the same numbers up to rounding. Returns the paths.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    init: dict[str, Tensor] = {}
    for name, shape in param_shapes(spec).items():
        if name.startswith("bn") and name.endswith(".weight"):
            value = torch.ones(shape, dtype=torch.float64)
        elif name.endswith(".bias"):
            value = torch.zeros(shape, dtype=torch.float64)
        else:
            value = _xavier_uniform(shape, gen)
        init[name] = value.to(dtype)
    image = (spec.channels, spec.image_size, spec.image_size)
    t = spec.meta_batch
    f64 = torch.float64
    data = {
        "support_x": torch.randn((t, spec.support_size, *image), generator=gen, dtype=f64),
        "support_y": torch.arange(spec.ways).repeat_interleave(spec.shots).repeat(t, 1),
        "query_x": torch.randn((t, spec.query_size, *image), generator=gen, dtype=f64),
        "query_y": torch.arange(spec.ways).repeat_interleave(spec.queries).repeat(t, 1),
    }
    data["support_x"] = data["support_x"].to(dtype)
    data["query_x"] = data["query_x"].to(dtype)
    init_path, data_path = Path(spec.init_path), Path(spec.data_path)
    init_path.parent.mkdir(parents=True, exist_ok=True)
    data_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(init, init_path)
    torch.save(data, data_path)
    return init_path, data_path


def load_data(spec: Spec, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Read the data file, check shapes against ``spec``, move images to ``device``/``dtype``."""
    raw = torch.load(spec.data_path, map_location="cpu", weights_only=True)
    image = (spec.channels, spec.image_size, spec.image_size)
    t = spec.meta_batch
    expected = {
        "support_x": (t, spec.support_size, *image),
        "support_y": (t, spec.support_size),
        "query_x": (t, spec.query_size, *image),
        "query_y": (t, spec.query_size),
    }
    out: dict[str, Tensor] = {}
    for key, shape in expected.items():
        if key not in raw:
            raise ValueError(f"load_data: {spec.data_path} has no {key!r}; it has {sorted(raw)}.")
        if tuple(raw[key].shape) != shape:
            raise ValueError(
                f"load_data: {spec.data_path}[{key!r}] has shape {tuple(raw[key].shape)}; the "
                f"spec needs {shape}. Rewrite it with make_inputs(spec, seed)."
            )
        value = raw[key]
        out[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    return out
