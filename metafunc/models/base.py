"""The model protocol and the functional layers models are built from.

A model is a pair of pure functions over a flat ``{'layer.weight': tensor}`` parameter dict (the
layout of a ``state_dict``)::

    params = model.init(generator)                      # -> dict of tensors
    y = model.apply(params, x)                           # batch statistics in batch norm
    y, state = model.apply(params, x, state=state)       # explicit running statistics

State (batch-norm running statistics) is never hidden in the model: ``model.init_state()`` makes
it, ``apply`` takes it and returns the new one. Without ``state``, batch norm normalises with the
statistics of the batch it sees, per task under ``vmap`` (MAML's setting).

The layers here are the reference implementations, one each, the same on every device.
:mod:`metafunc.kernels` computes the convolution and batch norm faster on the CPU; a model
takes them by its ``kernels`` option (:func:`layers`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from metafunc._transforms import under_vmap

__all__ = [
    "Model",
    "Params",
    "State",
    "batch_norm",
    "conv2d",
    "conv_init",
    "linear_init",
]

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Model:
    """A model as pure functions.

    Attributes:
        init: ``init(generator=None, *, dtype=torch.float32, device=None) -> params``. Draws on the
            CPU from ``generator`` (a fixed seed when ``None``) and then moves to ``device``, so a
            seed gives the same initial parameters on every device.
        apply: ``apply(params, x, *, state=None, training=True)``: returns ``y``, or
            ``(y, new_state)`` when ``state`` is given.
        init_state: ``init_state(*, dtype=torch.float32, device=None) -> state``: the running
            statistics of every batch norm (an empty dict for a model without any).
        features: ``features(params, x) -> embedding``, the network without its head, where the
            model has a linear head (``None`` otherwise). ANIL, Prototypical Networks and the
            fine-tune baseline use it.
        head: the path prefix of the linear head (``'head'``), or ``None``.
        name: a short description, for logs.
    """

    init: Callable[..., Params]
    apply: Callable[..., Any]
    init_state: Callable[..., State]
    features: Callable[..., torch.Tensor] | None = None
    head: str | None = None
    name: str = "model"

    def inference(self) -> Model:
        """This model with ``apply``'s ``training`` defaulting to ``False``: dropout off, and
        batch norm with running statistics where a state is given (without one, each batch's
        own statistics, as in training). ``Algorithm.evaluate`` evaluates with it. Made once
        per model, so what algorithms find out about a model by running it (its convolutions,
        whether ``vmap`` is exact) is found once for its inference twin too."""
        twin = self.__dict__.get("_inference")
        if twin is None:
            twin = dataclasses.replace(self, apply=functools.partial(self.apply, training=False))
            object.__setattr__(self, "_inference", twin)
        return twin


def conv_init(
    generator: torch.Generator,
    out_ch: int,
    in_ch: int,
    k: int,
    *,
    bias: bool = True,
    mode: str = "xavier",
) -> dict[str, torch.Tensor]:
    """Weight (and zero bias) of a ``k x k`` convolution, drawn from ``generator``.

    ``mode='xavier'`` is Glorot-uniform (MAML's conv initialiser); ``'kaiming'`` is He-normal with
    fan-out (the usual ResNet-12 initialiser).
    """
    w = torch.empty(out_ch, in_ch, k, k)
    if mode == "xavier":
        torch.nn.init.xavier_uniform_(w, generator=generator)
    elif mode == "kaiming":
        torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu", generator=generator)
    else:
        raise ValueError(f"conv_init(mode): mode must be 'xavier' or 'kaiming', got {mode!r}.")
    out = {"weight": w}
    if bias:
        out["bias"] = torch.zeros(out_ch)
    return out


def linear_init(
    generator: torch.Generator, out_f: int, in_f: int, *, mode: str = "xavier", std: float = 0.01
) -> dict[str, torch.Tensor]:
    """Weight and zero bias of a linear layer: Glorot-uniform, or truncated normal with ``std``
    (``mode='normal'``, the initialiser of MAML's sinusoid network)."""
    w = torch.empty(out_f, in_f)
    if mode == "xavier":
        torch.nn.init.xavier_uniform_(w, generator=generator)
    elif mode == "normal":
        torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)
    else:
        raise ValueError(f"linear_init(mode): mode must be 'xavier' or 'normal', got {mode!r}.")
    return {"weight": w, "bias": torch.zeros(out_f)}


def prefixed(prefix: str, tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{'weight': w}`` -> ``{'prefix.weight': w}``."""
    return {f"{prefix}.{k}": v for k, v in tree.items()}


def finalize(
    params: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
) -> Params:
    """Cast freshly drawn CPU parameters to ``dtype`` and move them to ``device``."""
    return {k: v.to(dtype=dtype, device=device) for k, v in params.items()}


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
) -> torch.Tensor:
    """A 2-D convolution, ``F.conv2d(x, weight, bias, stride, padding)``: the reference that
    :func:`metafunc.kernels.conv2d` computes faster on the CPU."""
    return F.conv2d(x, weight, bias, stride, padding)


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Batch normalisation over dim 1 of ``x``, exact to every order under ``torch.func.vmap``.

    With ``training`` (or without running statistics) it normalises with the batch's own
    statistics and, when running statistics are given, returns them updated as
    ``torch.nn.BatchNorm`` does (momentum, unbiased variance, no gradient). Otherwise it
    normalises with the running statistics and returns them unchanged.

    Batch statistics come from ``F.batch_norm``'s fused kernel, except under ``vmap``:
    ``F.batch_norm`` in training mode gives wrong second-order gradients there on torch 2.14
    (functorch#534), so under ``vmap`` this is written from primitive ops (the mean, the mean of
    the squared centred input, rsqrt, one multiply-add), which are exact (tested against a
    per-task loop). A rule for correctness, not speed: outside ``vmap`` the fused kernel is
    exact, and leaner than the primitive ops' double-backward graph (HISTORY "fused batch norm
    outside vmap").

    Returns:
        ``(y, new_running_mean, new_running_var)``; the last two are ``None`` when no running
        statistics were given.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    batch_stats = training or running_mean is None or running_var is None
    if batch_stats and not under_vmap():
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        if running_mean is not None and running_var is not None:
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
            running_mean, running_var = update_running(
                running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
            )
        return y, running_mean, running_var
    if batch_stats:
        mean, centred, var = bn_statistics(x, lambda t: t.mean(dim=dims), shape)
        if running_mean is not None and running_var is not None:
            running_mean, running_var = update_running(
                running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
            )
    else:
        assert running_mean is not None and running_var is not None
        centred, var = x - running_mean.view(shape), running_var
    # one pass for scale and shift: y = centred * (rstd * weight) + bias
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if bias is None:
        return centred * scale.view(shape), running_mean, running_var
    return torch.addcmul(bias.view(shape), centred, scale.view(shape)), running_mean, running_var


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: int,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.BatchNorm``'s update from a batch's mean and biased variance over ``n``
    values per channel (unbiased variance, momentum, no gradient)."""
    unbiased = var.detach() * (n / max(n - 1, 1))
    return (
        (1 - momentum) * running_mean + momentum * mean.detach(),
        (1 - momentum) * running_var + momentum * unbiased,
    )


def bn_statistics(
    x: torch.Tensor, mean: Callable[[torch.Tensor], torch.Tensor], shape: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, x - mean, biased var)`` by the reduction ``mean`` (``shape`` broadcasts a
    statistic back to ``x``): two passes, the variance from the centred values."""
    m = mean(x)
    centred = x - m.view(shape)
    return m, centred, mean(centred * centred)


class Conv2dFn(Protocol):
    """The signature of :func:`conv2d` and :func:`metafunc.kernels.conv2d`."""

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: int = 1,
        padding: int = 0,
    ) -> torch.Tensor: ...


class BatchNormFn(Protocol):
    """The signature of :func:`batch_norm` and :func:`metafunc.kernels.batch_norm`."""

    def __call__(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None = None,
        running_var: torch.Tensor | None = None,
        *,
        training: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]: ...


class Layers(NamedTuple):
    """The convolution and batch norm a model calls, as its ``kernels`` option chose them."""

    conv2d: Conv2dFn
    batch_norm: BatchNormFn


#: The values of the convolutional models' ``kernels`` option.
KERNELS = ("reference", "cpu")


def layers(call: str, kernels: object) -> Layers:
    """The layers of a model's ``kernels`` option: ``'reference'``, this module's
    :func:`conv2d` and :func:`batch_norm` on every device; ``'cpu'``, :mod:`metafunc.kernels`'
    (the same values, faster on the CPU, the reference elsewhere). ``call`` names the model in
    the error for any other value."""
    if kernels == "reference":
        return Layers(conv2d, batch_norm)
    if kernels == "cpu":
        # imported here: metafunc.kernels builds on this module's layers
        from metafunc import kernels as cpu

        return Layers(cpu.conv2d, cpu.batch_norm)
    raise ValueError(
        f"{call}(kernels): {kernels!r} is not one of {KERNELS}: 'reference' is the plain layers "
        "on every device, 'cpu' the same values by metafunc.kernels, faster on the CPU. Pass "
        f"{call}(kernels='cpu') for a model that runs on the CPU, else leave the default."
    )


def bn_layer(
    params: Params,
    state: State | None,
    new_state: State,
    name: str,
    x: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
    *,
    norm: BatchNormFn = batch_norm,
) -> torch.Tensor:
    """Apply the batch norm ``name`` of a native model by ``norm``, recording its new running
    statistics."""
    if state is None:
        y, _, _ = norm(x, params[f"{name}.weight"], params[f"{name}.bias"])
        return y
    y, mean, var = norm(
        x,
        params[f"{name}.weight"],
        params[f"{name}.bias"],
        state[f"{name}.running_mean"],
        state[f"{name}.running_var"],
        training=training,
        momentum=momentum,
    )
    assert mean is not None and var is not None
    new_state[f"{name}.running_mean"] = mean
    new_state[f"{name}.running_var"] = var
    return y


def bn_params(name: str, channels: int) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": torch.ones(channels), f"{name}.bias": torch.zeros(channels)}


def bn_state(
    names: list[tuple[str, int]], dtype: torch.dtype, device: torch.device | str | None
) -> State:
    state: State = {}
    for name, channels in names:
        state[f"{name}.running_mean"] = torch.zeros(channels, dtype=dtype, device=device)
        state[f"{name}.running_var"] = torch.ones(channels, dtype=dtype, device=device)
    return state


def linear(x: torch.Tensor, params: Params, name: str) -> torch.Tensor:
    return F.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])


def check_input(call: str, x: torch.Tensor, ndim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{call}: x is a {type(x).__qualname__}; pass a tensor shaped {what}.")
    if x.dim() != ndim:
        raise ValueError(f"{call}: x has shape {tuple(x.shape)}; expected {what}.")
