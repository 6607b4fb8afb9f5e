"""The model protocol and the functional layers models are built from.

A model is a pair of pure functions over a flat ``{'layer.weight': tensor}`` parameter dict (the
layout of a ``state_dict``)::

    params = model.init(generator)                      # -> dict of tensors
    y = model.apply(params, x)                           # batch statistics in batch norm
    y, state = model.apply(params, x, state=state)       # explicit running statistics

State (batch-norm running statistics) is never hidden in the model: ``model.init_state()`` makes
it, ``apply`` takes it and returns the new one. Without ``state``, batch norm normalises with the
statistics of the batch it sees, per task under ``vmap`` (MAML's setting).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from metafunc._transforms import any_transform, under_vmap

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
        vmap_exact: whether ``apply`` is known to give exact (second-order) gradients under
            ``torch.func.vmap``: true for metafunc's own models (each tested against a per-task
            loop), false for :func:`from_module` (a custom layer may call ``F.batch_norm`` or
            draw random numbers). Algorithms only batch work under ``vmap`` that the chosen
            strategy would not have batched (``MAML.shared_first_step``) when it is true.
    """

    init: Callable[..., Params]
    apply: Callable[..., Any]
    init_state: Callable[..., State]
    features: Callable[..., torch.Tensor] | None = None
    head: str | None = None
    name: str = "model"
    vmap_exact: bool = False

    def inference(self) -> Model:
        """This model with ``apply``'s ``training`` defaulting to ``False``: dropout off, and
        batch norm with running statistics where a state is given (without one, each batch's
        own statistics, as in training). ``Algorithm.evaluate`` evaluates with it."""
        return dataclasses.replace(self, apply=functools.partial(self.apply, training=False))


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
    """Batch normalisation over dim 1 of ``x`` written from primitive ops (the mean, the mean of
    the squared centred input, rsqrt, one multiply-add).

    ``F.batch_norm`` in training mode gives wrong second-order gradients under
    ``torch.func.vmap`` on torch 2.14 (functorch#534); under ``vmap`` this version uses the
    primitive ops, which are exact (tested against a per-task loop), and elsewhere the fused
    ``F.batch_norm`` (exact there, and leaner than the primitive ops' double-backward graph;
    HISTORY "fused batch norm outside vmap").

    With ``training`` (or without running statistics) it normalises with the batch's own
    statistics and, when running statistics are given, returns them updated as
    ``torch.nn.BatchNorm`` does (momentum, unbiased variance, no gradient). Otherwise it
    normalises with the running statistics and returns them unchanged.

    A channels-last ``x`` on the CPU (what :func:`conv2d` makes there by default) is
    normalised as the ``[pixels, channels]`` matrix it is in memory, where the CPU kernels run
    faster than on the strided 4-D view (HISTORY "Channels-last convolutions"). Where autograd
    records it, outside ``torch.func`` transforms, that is :class:`_RowBatchNorm`: torch's
    fused kernel for this layout sums each channel in one float32 running sum (about 1e-6
    relative error against 1e-7 in the default layout, which five second-order inner steps
    amplify into a visibly different meta-gradient), so the statistics come from torch's
    pairwise reductions instead.
    Elsewhere (a forward-only pass; inside a transform, where a custom autograd function would
    need rules of its own) it is the fused kernel.

    Returns:
        ``(y, new_running_mean, new_running_var)``; the last two are ``None`` when no running
        statistics were given.
    """
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    batch_stats = training or running_mean is None or running_var is None
    if x.device.type == "cpu" and not under_vmap() and _channels_last_strided(x):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        if batch_stats and _differentiated(x, weight, bias):
            y, mean, var = _RowBatchNorm.apply(rows, weight, bias, eps)
            if running_mean is not None and running_var is not None:
                running_mean, running_var = _update_running(
                    running_mean, running_var, mean, var, rows.shape[0], momentum
                )
        else:
            y, running_mean, running_var = batch_norm(
                rows,
                weight,
                bias,
                running_mean,
                running_var,
                training=training,
                momentum=momentum,
                eps=eps,
            )
        return y.view(n, h, w, c).permute(0, 3, 1, 2), running_mean, running_var
    if batch_stats and not under_vmap():
        # Outside vmap the fused kernel is exact to second order, and faster and leaner.
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        if running_mean is not None and running_var is not None:
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
            running_mean, running_var = _update_running(
                running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum
            )
        return y, running_mean, running_var
    if batch_stats:
        mean, centred, var = _statistics(x, lambda t: t.mean(dim=dims), shape)
        if running_mean is not None and running_var is not None:
            running_mean, running_var = _update_running(
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


def _update_running(
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


def _differentiated(*tensors: torch.Tensor | None) -> bool:
    # where autograd records the call and metafunc's own autograd functions (_RowBatchNorm,
    # _Conv2d) can run: their backward is what they change (a forward-only pass, e.g. under
    # no_grad, keeps torch's kernels), and inside torch.func transforms or torch.compile a
    # custom autograd function would need rules of its own
    return (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
        and not any_transform()
        and not torch.compiler.is_compiling()
    )


class _RowBatchNorm(torch.autograd.Function):
    """Batch norm (batch statistics) of a ``[rows, channels]`` matrix whose statistics are sums
    by torch's reductions, which add in a pairwise cascade: accurate in float32.

    ``forward(x, weight, bias, eps) -> (y, mean, biased var)``. The backward is torch's fused
    kernel for a first-order backward (whose running sums measured harmless: on a real Omniglot
    20-way meta-batch the float32 meta-gradient keeps its default-layout accuracy) and, under
    ``create_graph``, :class:`_RowBatchNormGrads`, whose own backward (second-order MAML's double
    backward) is written out in closed form, the statistics' dependence on ``x`` included.
    Tested in float64 against finite differences and, to the third order, against batch norm
    written out from mean, var, rsqrt.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, centred, var = _row_statistics(x)
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        y = centred * scale if bias is None else torch.addcmul(bias, centred, scale)
        y = y.to(x.dtype)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_b]
            )
            return gx, gw, gb, None
        gx, gw, gb = _RowBatchNormGrads.apply(grad_y, x, weight, mean, invstd, ctx.eps)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None)


class _RowBatchNormGrads(torch.autograd.Function):
    """``(grad x, grad weight, grad bias)`` of ``<grad_y, y>`` for :class:`_RowBatchNorm`'s
    ``y``, with the statistics ``mean`` and ``invstd`` of ``x`` given: its backward (the double
    backward of second-order MAML) is the closed form below, a dozen passes over the matrix,
    instead of autograd's through the recomputed statistics (three times as many ops).

    Per channel, with ``n`` rows, ``r = invstd``, ``h = (x - mean) r``, ``gb = sum g``,
    ``G = sum g h`` and ``gx = w r (g - gb / n - h G / n)``; given the cotangents ``u`` (of
    ``gx``), ``p`` (of the weight's gradient) and ``q`` (of the bias's), and ``S = sum u h``,
    ``A = sum g (u - mean u)``, ``k = w r^2 / n``:

    - ``d g = w r (u - mean u - h S / n) + p h + q``;
    - ``d w = r (A - G S / n)``;
    - ``d x = k (h (3 G S / n - A) - S (g - gb / n) - G (u - mean u)) + p r (g - gb / n - h G / n)``

    (``x`` moves ``h`` and ``r``: ``dh_j/dx_i = r (delta_ij - 1/n - h_i h_j / n)``,
    ``dr/dx_i = -r^2 h_i / n``). Where the backward is itself recorded (third order), the
    statistics are recomputed from ``x`` by differentiable ops and the same formulas run on
    them. Tested in float64 against finite differences and to the third order against batch
    norm written out from mean, var and rsqrt."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(grad_y, x, weight, mean, invstd)
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        h = _normalised(x, mean, invstd)
        g = grad_y.to(h.dtype)
        n = x.shape[0]
        gb = _column_sum(g)
        gw = _column_sum(g * h)
        a = invstd if weight is None else invstd * weight
        gx = torch.addcmul(torch.addcmul(-(a * gb / n), h, -(a * gw / n)), g, a)
        return gx.to(x.dtype), gw, gb

    @staticmethod
    def backward(
        ctx: Any, u: torch.Tensor | None, p: torch.Tensor | None, q: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        grad_y, x, weight, mean, invstd = ctx.saved_tensors
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # recorded: the statistics as functions of x
            mean, h, var = _row_statistics(x)
            invstd = torch.rsqrt(var + ctx.eps)
            h = h * invstd
        else:
            h = _normalised(x, mean, invstd)
        g, r, n = grad_y.to(h.dtype), invstd, x.shape[0]
        wr = r if weight is None else r * weight
        gbar = _column_sum(g) / n
        big_g = _column_sum(g * h)
        # d g and d x as per-channel coefficients of h, g, u and a constant
        dg_h = torch.zeros_like(r) if p is None else p
        dg_c = torch.zeros_like(r) if q is None else q
        dx_h, dx_g, dx_c = torch.zeros_like(r), torch.zeros_like(r), torch.zeros_like(r)
        dx_u = dw = None
        if u is not None:
            u = u.to(h.dtype)
            ubar = _column_sum(u) / n
            s = _column_sum(u * h)
            a = _column_sum(g * u) - n * gbar * ubar
            dg_h = dg_h - wr * s / n
            dg_c = dg_c - wr * ubar
            k = wr * r / n
            dx_h = k * (3 * big_g * s / n - a)
            dx_g = -k * s
            dx_u = -k * big_g
            dx_c = k * (s * gbar + big_g * ubar)
            dw = r * (a - big_g * s / n)
        if p is not None:
            pr = p * r
            dx_h = dx_h - pr * big_g / n
            dx_g = dx_g + pr
            dx_c = dx_c - pr * gbar
        d_g = d_x = None
        if need_g:
            d_g = torch.addcmul(dg_c, h, dg_h)
            d_g = d_g if u is None else torch.addcmul(d_g, u, wr)
            d_g = d_g.to(grad_y.dtype)
        if need_x and (u is not None or p is not None):
            d_x = torch.addcmul(torch.addcmul(dx_c, h, dx_h), g, dx_g)
            d_x = d_x if u is None or dx_u is None else torch.addcmul(d_x, u, dx_u)
            d_x = d_x.to(x.dtype)
        return d_g, d_x, dw if need_w else None, None, None, None


def _normalised(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    # (x - mean) * invstd, at least in float32 (the statistics' dtype)
    return (x.to(mean.dtype) - mean) * invstd


def _statistics(
    x: torch.Tensor, mean: Callable[[torch.Tensor], torch.Tensor], shape: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean, x - mean, biased var)`` by the reduction ``mean`` (``shape`` broadcasts a
    statistic back to ``x``): two passes, the variance from the centred values."""
    m = mean(x)
    centred = x - m.view(shape)
    return m, centred, mean(centred * centred)


def _row_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_statistics` over the rows (by :func:`_column_sum`), at least in float32 (a
    bfloat16 ``x`` under CPU autocast gets float32 statistics, as torch's kernel keeps them)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return _statistics(x, lambda t: _column_sum(t) / t.shape[0], [1, -1])


def _column_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0)`` of a ``[rows, channels]`` matrix, as one slab of rows per intra-op thread.

    torch splits a reduction over dim 0 by columns, so each thread reads part of every row,
    half of them (with two threads) just written by the other core in the elementwise op before;
    its reductions over the leading dim of ``[threads, rows / threads, channels]`` split by
    slabs, so each thread reads the rows it wrote (measurements: HISTORY "Reductions split as
    the data was written"). Sums by torch's pairwise cascade either way."""
    rows, slabs = x.shape[0], torch.get_num_threads()
    if slabs == 1 or rows < 2 * slabs:
        return x.sum(0)
    per = rows // slabs
    if per * slabs == rows:  # no slice: its backward (a double backward's) is zeros and a copy
        return x.reshape(slabs, per, -1).sum(1).sum(0)
    return x[: per * slabs].reshape(slabs, per, -1).sum(1).sum(0) + x[per * slabs :].sum(0)


def bn_layer(
    params: Params,
    state: State | None,
    new_state: State,
    name: str,
    x: torch.Tensor,
    training: bool,
    momentum: float = 0.1,
) -> torch.Tensor:
    """Apply the batch norm ``name`` of a native model, recording its new running statistics."""
    if state is None:
        y, _, _ = batch_norm(x, params[f"{name}.weight"], params[f"{name}.bias"])
        return y
    y, mean, var = batch_norm(
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


def _channels_last_strided(x: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and x.shape[1] > 1
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def check_channels_last(call: str, value: object) -> bool | None:
    if not (value is None or isinstance(value, bool)):
        raise ValueError(
            f"{call}(channels_last): must be None (channels-last on the CPU), True (on every "
            f"device) or False (never), got {value!r}."
        )
    return value


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with explicit channels-last strides (a one-channel ``[N, 1, H, W]`` tensor counts
    as channels-last-contiguous already, but oneDNN keeps the format only from these strides)
    when it is a 4-D tensor outside ``torch.func`` transforms and ``torch.compile``."""
    if x.dim() != 4 or any_transform() or torch.compiler.is_compiling():
        return x
    return x.to(memory_format=torch.channels_last)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    *,
    channels_last: bool | None = False,
) -> torch.Tensor:
    """``F.conv2d``; with ``channels_last`` (``None``: where ``x`` is on the CPU and has at
    least :data:`CHANNELS_LAST_MIN_PIXELS` pixels), on ``x`` in channels-last memory format
    (otherwise in ``x``'s: a channels-last ``x`` gives a channels-last output, as torch does).

    Only outside ``torch.func`` transforms and ``torch.compile`` (which pick their own layouts),
    so the weights' gradients come from ``torch.autograd`` (:func:`metafunc.inner.grad_with_aux`
    returns them contiguous). The output is channels-last too, so the next layer keeps it, and
    :func:`batch_norm` on the CPU normalises it as a ``[pixels, channels]`` matrix. Values are
    ``F.conv2d``'s up to float rounding; see :func:`~metafunc.models.conv4` for what it costs
    and gains.

    Where autograd records the call on the CPU (outside transforms, ``torch.compile`` and
    autocast) its backward is :class:`_Conv2d`'s, whose double backward uses oneDNN's forward
    and backward kernels throughout (measured on the CPU only; CUDA keeps torch's).
    """
    cpu = x.device.type == "cpu"
    if channels_last or (channels_last is None and cpu and _worth_it(x)):
        x = to_channels_last(x)
    if cpu and _differentiated(x, weight, bias) and not torch.is_autocast_enabled("cpu"):
        return cast(torch.Tensor, _Conv2d.apply(x, weight, bias, stride, padding))
    return F.conv2d(x, weight, bias, stride, padding)


def _conv_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: int,
    mask: list[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    # (grad x, grad weight, grad bias) of <grad_y, conv2d(x, weight, bias)>, those in mask
    bias = [weight.shape[0]] if mask[2] else None
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_y, x, weight, bias, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask
    )
    return gx, gw, gb


class _Conv2d(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride, padding)`` whose backward under ``create_graph`` is
    :class:`_ConvGrads`, so that a double backward (second-order MAML) computes the gradient
    of the weight gradient by oneDNN's weight-gradient kernel: torch's own double backward
    does it as a dilated convolution over the batch, a slower kernel (measurements: HISTORY
    "The convolutions' double backward"). A first-order backward is torch's own single call.
    Tested in float64 against finite differences and, to the third order, against
    ``F.conv2d``. Not under autocast (whose casts a custom function would have to repeat) nor
    where :func:`_differentiated` says no."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():
            gx, gw, gb = _conv_grads(grad_y, x, weight, stride, padding, [need_x, need_w, need_b])
            return gx, gw, gb, None, None
        gx = gw = None
        if need_x or need_w:
            gx, gw = _ConvGrads.apply(grad_y, x, weight, stride, padding, need_x, need_w)
        gb = grad_y.sum((0, 2, 3)) if need_b else None
        return gx, gw, gb, None, None


class _ConvGrads(torch.autograd.Function):
    """``(grad x, grad weight)`` of ``<grad_y, conv2d(x, weight)>`` in one call (``None`` where
    not asked for): bilinear in ``(grad_y, weight)`` and in ``(grad_y, x)``, so its own
    backward is two convolutions and two more of these, each by a forward or backward kernel."""

    @staticmethod
    def forward(
        ctx: Any,
        grad_y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        stride: int,
        padding: int,
        need_x: bool,
        need_w: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        ctx.save_for_backward(grad_y, x, weight)
        ctx.conf = (stride, padding)
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not zeros
        gx, gw, _ = _conv_grads(grad_y, x, weight, stride, padding, [need_x, need_w, False])
        return gx, gw

    @staticmethod
    def backward(
        ctx: Any, gg_x: torch.Tensor | None, gg_w: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        grad_y, x, weight = ctx.saved_tensors
        stride, padding = ctx.conf
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        g_gy = g_x = g_w = None
        if need_gy and gg_x is not None:
            g_gy = _Conv2d.apply(gg_x, weight, None, stride, padding)
        if need_gy and gg_w is not None:
            term = _Conv2d.apply(x, gg_w, None, stride, padding)
            g_gy = term if g_gy is None else g_gy + term
        if need_x and gg_w is not None:
            g_x = _ConvGrads.apply(grad_y, x, gg_w, stride, padding, True, False)[0]
        if need_w and gg_x is not None:
            g_w = _ConvGrads.apply(grad_y, gg_x, weight, stride, padding, False, True)[1]
        return g_gy, g_x, g_w, None, None, None, None


# conv2d(channels_last=None) converts a default-layout input of at least this many pixels
# (batch x height x width): below it the layout's fixed costs per layer (conversions, the
# accurate batch norm's extra ops) outweigh the faster convolutions.
# fixed costs vs faster convolutions, see HISTORY "Channels-last convolutions"
CHANNELS_LAST_MIN_PIXELS = 4096


def _worth_it(x: torch.Tensor) -> bool:
    # pixels shrink from layer to layer, so a network converts at its first layer or never
    return x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] >= CHANNELS_LAST_MIN_PIXELS


def linear(x: torch.Tensor, params: Params, name: str) -> torch.Tensor:
    return F.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])


def check_input(call: str, x: torch.Tensor, ndim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{call}: x is a {type(x).__qualname__}; pass a tensor shaped {what}.")
    if x.dim() != ndim:
        raise ValueError(f"{call}: x has shape {tuple(x.shape)}; expected {what}.")
