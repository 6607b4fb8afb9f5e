"""Ready-made optimizers, each a ``chain`` of transforms matching ``torch.optim`` step for step."""

from __future__ import annotations

from metafunc.optim.base import GradientTransformation, chain
from metafunc.optim.transforms import (
    LearningRate,
    add_decayed_weights,
    check_nonnegative,
    check_range,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = ["adam", "adamw", "sgd"]


def sgd(
    lr: LearningRate,
    momentum: float = 0.0,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    per_step: bool = False,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD``.

    ``lr`` may be a float, a schedule, a tensor or a tree of tensors (per-leaf rates; with
    ``per_step=True`` one rate per inner step). MAML's inner loop is ``sgd(alpha)``; Meta-SGD's
    is ``sgd(alpha_tree)``; MAML++'s is ``sgd(lslr_tree, per_step=True)``.
    """
    call = "sgd(lr, momentum, ...)"
    check_nonnegative(call, "lr", lr)
    check_range(call, "momentum", momentum)
    check_nonnegative(call, "weight_decay", weight_decay)
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    if momentum:
        parts.append(trace(momentum, nesterov=nesterov, dampening=dampening))
    elif nesterov:
        raise ValueError("sgd(...): nesterov=True needs momentum > 0.")
    parts.append(scale_by_learning_rate(lr, per_step=per_step))
    return chain(*parts)


def adam(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 0.0,
    eps_root: float = 0.0,
    per_step: bool = False,
) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015) as ``torch.optim.Adam``; ``weight_decay`` is L2 added to the
    gradient, as torch does."""
    _check_adam("adam(lr, b1, b2, eps, ...)", lr, b1, b2, eps, weight_decay)
    parts = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay))
    parts += [
        scale_by_adam(b1, b2, eps, eps_root=eps_root),
        scale_by_learning_rate(lr, per_step=per_step),
    ]
    return chain(*parts)


def adamw(
    lr: LearningRate,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: float = 1e-2,
    eps_root: float = 0.0,
    per_step: bool = False,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019) as ``torch.optim.AdamW``: decoupled weight decay,
    ``p <- p - lr * (adam_direction + weight_decay * p)``."""
    _check_adam("adamw(lr, b1, b2, eps, ...)", lr, b1, b2, eps, weight_decay)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root=eps_root),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(lr, per_step=per_step),
    )


def _check_adam(
    call: str, lr: LearningRate, b1: float, b2: float, eps: float, weight_decay: float
) -> None:
    # Checked here as well as in the transforms so that the message names the call the user made.
    check_nonnegative(call, "lr", lr)
    check_range(call, "b1", b1)
    check_range(call, "b2", b2)
    check_nonnegative(call, "eps", eps)
    check_nonnegative(call, "weight_decay", weight_decay)
