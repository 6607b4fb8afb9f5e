"""The CPU convolution: channels-last where a pass gains from it, and a double backward on
oneDNN's forward and backward kernels."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from metafunc.kernels.layout import differentiated, to_channels_last, worth_it

__all__ = ["conv2d"]


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
) -> torch.Tensor:
    """:func:`metafunc.models.base.conv2d` (``F.conv2d``), faster on the CPU; the reference
    itself for tensors elsewhere.

    On the CPU, an ``x`` of at least :data:`~metafunc.kernels.CHANNELS_LAST_MIN_PIXELS` pixels
    is convolved in channels-last memory format (otherwise in ``x``'s: a channels-last ``x``
    gives a channels-last output, as torch does), where oneDNN's convolutions are faster. The
    output is channels-last too, so the next layer keeps it, and
    :func:`metafunc.kernels.batch_norm` normalises it as a ``[pixels, channels]`` matrix. Only
    outside ``torch.func`` transforms and ``torch.compile`` (which pick their own layouts), so
    the weights' gradients come from ``torch.autograd`` (:func:`metafunc.inner.grad_with_aux`
    returns them contiguous). Values are ``F.conv2d``'s up to float rounding.

    Where autograd records the call (outside transforms, ``torch.compile`` and autocast) its
    backward is :class:`_Conv2d`'s, whose double backward uses oneDNN's forward and backward
    kernels throughout.
    """
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, stride, padding)
    if worth_it(x):
        x = to_channels_last(x)
    if differentiated(x, weight, bias) and not torch.is_autocast_enabled("cpu"):
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
    where :func:`~metafunc.kernels.layout.differentiated` says no."""

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
