"""The CPU batch norm of channels-last activations: the ``[pixels, channels]`` matrix they are
in memory, normalised with pairwise-summed statistics and a closed-form double backward."""

from __future__ import annotations

from typing import Any

import torch

from metafunc._transforms import under_vmap
from metafunc.kernels.layout import channels_last_strided, differentiated
from metafunc.models import base

__all__ = ["batch_norm", "column_sum"]


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
    """:func:`metafunc.models.batch_norm` (same arguments and returns), faster on a
    channels-last CPU ``x`` (what :func:`metafunc.kernels.conv2d` makes there); the reference
    itself for any other ``x`` and under ``torch.func.vmap``.

    Such an ``x`` is normalised as the ``[pixels, channels]`` matrix it is in memory, where the
    CPU kernels run faster than on the strided 4-D view. Where autograd records it, outside
    ``torch.func`` transforms, that is :class:`_RowBatchNorm`: torch's fused kernel for this
    layout sums each channel in one float32 running sum (about 1e-6 relative error against 1e-7
    in the default layout, which five second-order inner steps amplify into a visibly different
    meta-gradient), so the statistics come from torch's pairwise reductions instead. Elsewhere
    (a forward-only pass; inside a transform, where a custom autograd function would need rules
    of its own) it is the reference on the matrix.
    """
    if x.device.type != "cpu" or under_vmap() or not channels_last_strided(x):
        return base.batch_norm(
            x, weight, bias, running_mean, running_var,
            training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    batch_stats = training or running_mean is None or running_var is None
    if batch_stats and differentiated(x, weight, bias):
        y, mean, var = _RowBatchNorm.apply(rows, weight, bias, eps)
        if running_mean is not None and running_var is not None:
            running_mean, running_var = base.update_running(
                running_mean, running_var, mean, var, rows.shape[0], momentum
            )
    else:
        y, running_mean, running_var = base.batch_norm(
            rows, weight, bias, running_mean, running_var,
            training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
    return y.view(n, h, w, c).permute(0, 3, 1, 2), running_mean, running_var


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
        gb = column_sum(g)
        gw = column_sum(g * h)
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
        gbar = column_sum(g) / n
        big_g = column_sum(g * h)
        # d g and d x as per-channel coefficients of h, g, u and a constant
        dg_h = torch.zeros_like(r) if p is None else p
        dg_c = torch.zeros_like(r) if q is None else q
        dx_h, dx_g, dx_c = torch.zeros_like(r), torch.zeros_like(r), torch.zeros_like(r)
        dx_u = dw = None
        if u is not None:
            u = u.to(h.dtype)
            ubar = column_sum(u) / n
            s = column_sum(u * h)
            a = column_sum(g * u) - n * gbar * ubar
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


def _row_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~metafunc.models.base.bn_statistics` over the rows (by :func:`column_sum`), at
    least in float32 (a bfloat16 ``x`` under CPU autocast gets float32 statistics, as torch's
    kernel keeps them)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return base.bn_statistics(x, lambda t: column_sum(t) / t.shape[0], [1, -1])


def column_sum(x: torch.Tensor) -> torch.Tensor:
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
