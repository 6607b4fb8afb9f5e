"""Small gradient transformations; optimizers are ``chain``s of these.

All are out of place and differentiable, including with respect to tensor hyper-parameters (a
learning-rate tree meta-learned by Meta-SGD or MAML++ gets its gradient through ``update``).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import optree
import torch

from metafunc import tree as mt
from metafunc.optim.base import EmptyState, GradientTransformation, init_step

__all__ = [
    "LearningRate",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "TraceState",
    "add_decayed_weights",
    "clip_by_global_norm",
    "safe_sqrt",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "trace",
]

LearningRate = Any
"""A float, a 0-d tensor, a schedule ``count -> lr``, or a tree of tensors shaped like params
(per-leaf rates; with ``per_step=True`` each leaf has a leading inner-step axis)."""


def check_nonnegative(call: str, name: str, value: Any) -> None:
    if isinstance(value, numbers.Real) and (value < 0 or value != value):
        raise ValueError(f"{call}: {name} must be >= 0, got {value!r}.")


def check_range(call: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{call}: {name} must be in [0, 1), got {value!r}.")


def scale(factor: float | torch.Tensor) -> GradientTransformation:
    """``updates = factor * grads``."""

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return optree.tree_map(lambda t: factor * t, grads), state

    return GradientTransformation(lambda params: EmptyState(), update)


class ScaleByLearningRateState(NamedTuple):
    step: torch.Tensor


def _is_tree(lr: Any) -> bool:
    return isinstance(lr, (dict, list, tuple))


def scale_by_learning_rate(lr: LearningRate, *, per_step: bool = False) -> GradientTransformation:
    """``updates = -lr * grads`` (the descent direction).

    Args:
        lr: a non-negative float; a tensor (meta-learned, differentiable); a schedule
            ``count -> lr``; or a tree of tensors matching the params (per-leaf rates, as
            Meta-SGD learns). Leaves of a rate tree broadcast against the matching gradient.
        per_step: each leaf of a rate tree has a leading axis over inner steps and step ``k``
            uses ``lr[k]`` (MAML++'s per-layer, per-step rates).
    """
    call = "scale_by_learning_rate(lr)"
    check_nonnegative(call, "lr", lr)
    is_tree = _is_tree(lr)
    # decided once, and never callable() of a dict: dynamo before torch 2.14 cannot trace that
    is_schedule = not is_tree and not isinstance(lr, torch.Tensor) and callable(lr)
    if per_step and not is_tree and not isinstance(lr, torch.Tensor):
        raise ValueError(
            f"{call}: per_step=True needs a tensor or tree of tensors with a step axis."
        )
    if is_tree:
        for path, leaf in mt.flatten_with_paths(lr).items():
            if not isinstance(leaf, (torch.Tensor, numbers.Real)):
                raise TypeError(
                    f"{call}: lr[{path!r}] is a {type(leaf).__qualname__}; use tensors."
                )

    def init(params: Any) -> ScaleByLearningRateState:
        return ScaleByLearningRateState(init_step())

    def rate_tree(grads: Any, count: torch.Tensor) -> Any:
        if is_tree:
            mt.check_same_structure(call, (grads, lr), ("grads", "lr"))
            rates = lr
        else:
            rates = optree.tree_map(lambda _: lr, grads)
        if per_step:
            # the step as a tensor index: no host read, so a compiled step keeps one graph
            index = count.reshape(1).to(torch.int64)
            if not torch.compiler.is_compiling():
                k = int(count)
                short = [r for r in mt.leaves(rates) if k >= r.shape[0]]
                if short:
                    raise ValueError(
                        f"{call}: per-step rates have {short[0].shape[0]} steps but step {k} was "
                        "asked for; give one rate per inner step."
                    )

            def pick(r: torch.Tensor) -> torch.Tensor:
                return r.index_select(0, index.to(r.device)).squeeze(0)

            rates = optree.tree_map(pick, rates)
        return rates

    def update(
        grads: Any, state: ScaleByLearningRateState, params: Any = None
    ) -> tuple[Any, ScaleByLearningRateState]:
        if is_schedule:
            step_lr = lr(state.step)
            updates = optree.tree_map(lambda g: -step_lr.to(g.dtype) * g, grads)
        else:
            updates = optree.tree_map(lambda g, r: -r * g, grads, rate_tree(grads, state.step))
        return updates, ScaleByLearningRateState(state.step + 1)

    return GradientTransformation(init, update)


class TraceState(NamedTuple):
    step: torch.Tensor
    momentum: Any


def trace(
    decay: float, *, nesterov: bool = False, dampening: float = 0.0
) -> GradientTransformation:
    """Momentum exactly as ``torch.optim.SGD``.

    ``buf = g`` on the first step, then ``buf = decay * buf + (1 - dampening) * g``; the update is
    ``g + decay * buf`` with Nesterov, else ``buf``.
    """
    call = "trace(decay)"
    check_range(call, "decay", decay)
    check_range(call, "dampening", dampening)
    if nesterov and (decay <= 0 or dampening != 0):
        raise ValueError(f"{call}: nesterov needs decay > 0 and dampening 0 (as torch.optim.SGD).")

    def init(params: Any) -> TraceState:
        return TraceState(init_step(), mt.zeros_like(params))

    def update(grads: Any, state: TraceState, params: Any = None) -> tuple[Any, TraceState]:
        first = bool(state.step == 0)

        def step(g: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
            return g if first else decay * buf + (1.0 - dampening) * g

        buf = optree.tree_map(step, grads, state.momentum)
        updates = optree.tree_map(lambda g, b: g + decay * b, grads, buf) if nesterov else buf
        return updates, TraceState(state.step + 1, buf)

    return GradientTransformation(init, update)


class ScaleByAdamState(NamedTuple):
    step: torch.Tensor
    mu: Any
    nu: Any


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` whose derivative at 0 is 0 rather than inf (so 0 * inf never makes a NaN when
    differentiating through Adam where a gradient entry is exactly zero)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, eps_root: float = 0.0
) -> GradientTransformation:
    """Adam's direction, as ``torch.optim.Adam`` computes it::

        mu = b1 mu + (1 - b1) g;   nu = b2 nu + (1 - b2) g^2
        update = (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t) + eps_root) + eps)

    Kingma & Ba, 2015. ``eps_root`` > 0 smooths the square root for second-order use.
    """
    call = "scale_by_adam(...)"
    check_range(call, "b1", b1)
    check_range(call, "b2", b2)
    check_nonnegative(call, "eps", eps)
    check_nonnegative(call, "eps_root", eps_root)

    def init(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(init_step(), mt.zeros_like(params), mt.zeros_like(params))

    def update(grads: Any, state: ScaleByAdamState, params: Any = None) -> tuple[Any, Any]:
        count = state.step + 1
        t = int(count)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        mu = optree.tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, grads)
        nu = optree.tree_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, grads)
        updates = optree.tree_map(
            lambda m, v: (m / c1) / (safe_sqrt(v / c2 + eps_root) + eps), mu, nu
        )
        return updates, ScaleByAdamState(count, mu, nu)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float | torch.Tensor) -> GradientTransformation:
    """``updates = grads + weight_decay * params`` (L2 / decoupled decay depending on where it
    sits in the chain: before Adam it is torch's ``Adam(weight_decay)``, after it ``AdamW``)."""
    call = "add_decayed_weights(weight_decay)"
    check_nonnegative(call, "weight_decay", weight_decay)

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        if params is None:
            raise ValueError(f"{call}: update needs params; call opt.update(grads, state, params).")
        return optree.tree_map(lambda g, p: g + weight_decay * p, grads, params), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``, as
    ``torch.nn.utils.clip_grad_norm_`` does, with ``norm`` the global L2 norm."""
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm(max_norm): max_norm must be > 0, got {max_norm!r}.")

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        # The safe sqrt keeps second-order gradients finite when every gradient is exactly zero.
        norm = safe_sqrt(mt.vdot(grads, grads))
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return optree.tree_map(lambda g: g * factor.to(g.dtype), grads), state

    return GradientTransformation(lambda params: EmptyState(), update)
