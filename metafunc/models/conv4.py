"""MAML's four-block convolutional network (Finn et al. 2017; Vinyals et al. 2016)."""

from __future__ import annotations

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

__all__ = ["conv4"]

_POOLING = ("stride", "maxpool")


def conv4(
    num_classes: int | None = 5,
    *,
    in_channels: int = 1,
    hidden: int = 64,
    pooling: str = "stride",
    image_size: int = 28,
    bn_momentum: float = 0.1,
    kernels: str = "reference",
) -> Model:
    """Four blocks of [3x3 conv, batch norm, ReLU], then a linear head.

    ``pooling='stride'`` is MAML's Omniglot network: stride-2 convolutions (28 -> 14 -> 7 -> 4 ->
    2) and a mean over the remaining spatial positions, so the head sees ``hidden`` features.
    ``pooling='maxpool'`` is the mini-ImageNet network (use ``hidden=32``, ``in_channels=3``,
    ``image_size=84``): stride-1 convolutions, each block followed by 2x2 max-pooling
    (84 -> 42 -> 21 -> 10 -> 5), flattened (``hidden * 5 * 5`` features).

    Convolutions and head are Glorot-uniform with zero biases, batch norm weight 1, bias 0.
    ``kernels`` picks the convolution and batch norm: ``'reference'`` (the default), the
    plain layers of :mod:`metafunc.models.base` on every device; ``'cpu'``, those of
    :mod:`metafunc.kernels` (channels-last activations and custom double backwards on the CPU,
    the reference elsewhere), the same values, faster on the CPU.
    Parameters: ``conv{i}.weight/bias``, ``bn{i}.weight/bias`` (i = 0..3), ``head.weight/bias``.
    ``num_classes=None`` builds the embedding network alone (Prototypical Networks); then
    ``apply`` returns the features.
    """
    conv2d, norm = layers("conv4", kernels)
    if pooling not in _POOLING:
        raise ValueError(f"conv4(pooling): {pooling!r} is not one of {_POOLING}.")
    for name, value in (
        ("in_channels", in_channels),
        ("hidden", hidden),
        ("image_size", image_size),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"conv4({name}): must be a positive int, got {value!r}.")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
        raise ValueError(
            f"conv4(num_classes): must be a positive int or None, got {num_classes!r}."
        )
    stride = 2 if pooling == "stride" else 1
    size = image_size
    for _ in range(4):
        size = (size + 1) // 2 if pooling == "stride" else size // 2
    if size < 1:
        raise ValueError(f"conv4(image_size): {image_size} is too small for four 2x reductions.")
    feat_dim = hidden if pooling == "stride" else hidden * size * size
    bns = [(f"bn{i}", hidden) for i in range(4)]

    def init_fn(
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Params:
        g = default_generator(generator)
        params: Params = {}
        ch = in_channels
        for i in range(4):
            params.update(prefixed(f"conv{i}", conv_init(g, hidden, ch, 3)))
            params.update(bn_params(f"bn{i}", hidden))
            ch = hidden
        if num_classes is not None:
            params.update(prefixed("head", linear_init(g, num_classes, feat_dim)))
        return finalize(params, dtype, device)

    def body(
        params: Params, x: torch.Tensor, state: State | None, new_state: State, training: bool
    ) -> torch.Tensor:
        check_input("conv4.apply(params, x)", x, 4, f"[batch, {in_channels}, H, W]")
        for i in range(4):
            x = conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
            x = bn_layer(params, state, new_state, f"bn{i}", x, training, bn_momentum, norm=norm)
            x = F.relu(x)
            if pooling == "maxpool":
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3)) if pooling == "stride" else x.flatten(1)

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
        name=f"conv4-{hidden}-{pooling}{'-cpu-kernels' if kernels == 'cpu' else ''}",
    )
