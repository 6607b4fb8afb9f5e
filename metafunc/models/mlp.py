"""The fully connected network of MAML's sinusoid experiment (1-40-40-1, ReLU)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metafunc.models.base import (
    Model,
    Params,
    State,
    check_input,
    default_generator,
    finalize,
    linear,
    linear_init,
    prefixed,
)

__all__ = ["mlp"]


def mlp(
    sizes: Sequence[int] = (1, 40, 40, 1),
    *,
    activation: str = "relu",
    init: str = "normal",
) -> Model:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    The defaults are Finn et al. (2017), §5.1: two hidden layers of 40 ReLU units, weights drawn
    from a truncated normal with std 0.01 and zero biases (``init='xavier'`` for Glorot).
    Parameters are ``fc0.*``, ``fc1.*``, ... and the last layer ``head.*``.
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"mlp(sizes): need at least two positive ints, got {sizes!r}.")
    acts = {"relu": torch.relu, "tanh": torch.tanh}
    if activation not in acts:
        raise ValueError(f"mlp(activation): {activation!r} is not one of {sorted(acts)}.")
    act = acts[activation]
    names = [f"fc{i}" for i in range(len(sizes) - 2)] + ["head"]

    def init_fn(
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Params:
        g = default_generator(generator)
        params: Params = {}
        for name, fan_in, fan_out in zip(names, sizes[:-1], sizes[1:], strict=True):
            params.update(prefixed(name, linear_init(g, fan_out, fan_in, mode=init)))
        return finalize(params, dtype, device)

    def features(params: Params, x: torch.Tensor) -> torch.Tensor:
        check_input("mlp.apply(params, x)", x, 2, f"[batch, {sizes[0]}]")
        for name in names[:-1]:
            x = act(linear(x, params, name))
        return x

    def apply(
        params: Params, x: torch.Tensor, *, state: State | None = None, training: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, State]:
        y = linear(features(params, x), params, "head")
        return y if state is None else (y, state)

    def init_state(
        *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> State:
        return {}

    return Model(
        init_fn,
        apply,
        init_state,
        features=features,
        head="head",
        name=f"mlp{tuple(sizes)}",
    )
