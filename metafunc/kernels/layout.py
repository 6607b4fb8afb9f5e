"""Where the CPU kernels apply: the channels-last rule, and the calls a custom autograd function
may take over."""

from __future__ import annotations

import torch

from metafunc._transforms import any_transform

__all__ = [
    "CHANNELS_LAST_MIN_PIXELS",
    "channels_last_strided",
    "differentiated",
    "to_channels_last",
    "worth_it",
]

# fixed costs vs faster convolutions, see HISTORY "Channels-last convolutions"
CHANNELS_LAST_MIN_PIXELS = 4096
""":func:`metafunc.kernels.conv2d` converts a default-layout input of at least this many pixels
(batch x height x width) to channels-last: below it the layout's fixed costs per layer
(conversions, the accurate batch norm's extra ops) outweigh the faster convolutions."""


def worth_it(x: torch.Tensor) -> bool:
    """Whether a pass over ``x`` gains from channels-last (:data:`CHANNELS_LAST_MIN_PIXELS`).
    Pixels shrink from layer to layer, so a network converts at its first layer or never."""
    return x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] >= CHANNELS_LAST_MIN_PIXELS


def channels_last_strided(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``[N, C, H, W]`` tensor laid out channels-last and not also in the
    default layout (as a one-channel or one-pixel tensor can be)."""
    return (
        x.dim() == 4
        and x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with explicit channels-last strides (a one-channel ``[N, 1, H, W]`` tensor counts
    as channels-last-contiguous already, but oneDNN keeps the format only from these strides)
    when it is a 4-D tensor outside ``torch.func`` transforms and ``torch.compile``."""
    if x.dim() != 4 or any_transform() or torch.compiler.is_compiling():
        return x
    return x.to(memory_format=torch.channels_last)


def differentiated(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` where a custom autograd function can take
    it: grad mode on, some input requiring grad, outside ``torch.func`` transforms and
    ``torch.compile`` (where such a function would need rules of its own). The kernels'
    functions change the backward only, so a forward-only pass keeps torch's kernels."""
    return (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
        and not any_transform()
        and not torch.compiler.is_compiling()
    )
