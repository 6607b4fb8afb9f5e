"""The few-shot ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019; Tian et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from metafunc.models.base import (
    Model,
    Params,
    State,
    bn_layer,
    bn_params,
    bn_state,
    check_input,
    conv_init,
    default_generator,
    finalize,
    layers,
    linear,
    linear_init,
    prefixed,
)

__all__ = ["resnet12"]


def resnet12(
    num_classes: int | None = 5,
    *,
    in_channels: int = 3,
    channels: Sequence[int] = (64, 160, 320, 640),
    negative_slope: float = 0.1,
    bn_momentum: float = 0.1,
    kernels: str = "reference",
) -> Model:
    """ResNet-12: four residual blocks, each three [3x3 conv, batch norm, leaky ReLU] with a
    1x1-conv + batch-norm shortcut and 2x2 max-pooling, then global average pooling.

    Channels 64-160-320-640 give a 640-d embedding (12.4 M parameters without the head). Convs
    have no bias and He-normal (fan-out) weights. Parameters:
    ``layer{b}.conv{j}.weight``, ``layer{b}.bn{j}.weight/bias`` (j = 1..3),
    ``layer{b}.shortcut.conv.weight``, ``layer{b}.shortcut.bn.weight/bias``, ``head.*``.
    DropBlock is not included. ``kernels`` (``'reference'`` or ``'cpu'``): the convolution
    and batch norm, as in :func:`~metafunc.models.conv4`.
    """
    conv2d, norm = layers("resnet12", kernels)
    channels = list(channels)
    if len(channels) != 4 or any(not isinstance(c, int) or c <= 0 for c in channels):
        raise ValueError(f"resnet12(channels): need four positive ints, got {channels!r}.")
    bns: list[tuple[str, int]] = []
    for b, c in enumerate(channels):
        bns += [(f"layer{b}.bn{j}", c) for j in (1, 2, 3)] + [(f"layer{b}.shortcut.bn", c)]

    def init_fn(
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Params:
        g = default_generator(generator)
        params: Params = {}
        ch = in_channels
        for b, c in enumerate(channels):
            for j, cin in ((1, ch), (2, c), (3, c)):
                w = conv_init(g, c, cin, 3, bias=False, mode="kaiming")
                params.update(prefixed(f"layer{b}.conv{j}", w))
                params.update(bn_params(f"layer{b}.bn{j}", c))
            w = conv_init(g, c, ch, 1, bias=False, mode="kaiming")
            params.update(prefixed(f"layer{b}.shortcut.conv", w))
            params.update(bn_params(f"layer{b}.shortcut.bn", c))
            ch = c
        if num_classes is not None:
            params.update(prefixed("head", linear_init(g, num_classes, channels[-1])))
        return finalize(params, dtype, device)

    def body(
        params: Params, x: torch.Tensor, state: State | None, new_state: State, training: bool
    ) -> torch.Tensor:
        check_input("resnet12.apply(params, x)", x, 4, f"[batch, {in_channels}, H, W]")
        for b in range(4):
            p = f"layer{b}"
            out = x
            for j in (1, 2, 3):
                w = params[f"{p}.conv{j}.weight"]
                out = conv2d(out, w, padding=1)
                out = bn_layer(
                    params, state, new_state, f"{p}.bn{j}", out, training, bn_momentum, norm=norm
                )
                if j < 3:
                    out = F.leaky_relu(out, negative_slope)
            w = params[f"{p}.shortcut.conv.weight"]
            short = conv2d(x, w)
            short = bn_layer(
                params, state, new_state, f"{p}.shortcut.bn", short, training, bn_momentum,
                norm=norm,
            )  # fmt: skip
            x = F.max_pool2d(F.leaky_relu(out + short, negative_slope), 2)
        return x.mean(dim=(2, 3))

    def features(params: Params, x: torch.Tensor) -> torch.Tensor:
        return body(params, x, None, {}, True)

    def apply(
        params: Params, x: torch.Tensor, *, state: State | None = None, training: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        new_state: State = {}
        y = body(params, x, state, new_state, training)
        if num_classes is not None:
            y = linear(y, params, "head")
        return y if state is None else (y, new_state)

    def init_state(
        *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> State:
        return bn_state(bns, dtype, device)

    return Model(
        init_fn,
        apply,
        init_state,
        features=features,
        head="head" if num_classes is not None else None,
        name=f"resnet12-{'-'.join(map(str, channels))}"
        + ("-cpu-kernels" if kernels == "cpu" else ""),
    )
