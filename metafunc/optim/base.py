"""The optimizer protocol: a pair of pure functions, ``init`` and ``update``, as in optax.

``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``. Nothing is
modified in place, so gradients flow through every step of an inner loop, through the
optimizer's own state (momentum, Adam moments) and through tensor-valued hyper-parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from metafunc import tree as mt

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "apply_updates",
    "chain",
    "identity",
    "init_step",
]


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class GradientTransformation(NamedTuple):
    """An optimizer or a piece of one: ``init(params) -> state``,
    ``update(grads, state, params) -> (updates, new_state)``."""

    init: Callable[[Any], Any]
    update: Callable[[Any, Any, Any], tuple[Any, Any]]


def init_step() -> torch.Tensor:
    """A step counter: a 0-d ``int64`` tensor on the CPU (cheap to read, safe to checkpoint)."""
    return torch.zeros((), dtype=torch.int64)


def identity() -> GradientTransformation:
    """Leaves the gradients unchanged."""

    def update(grads: Any, state: EmptyState, params: Any = None) -> tuple[Any, EmptyState]:
        return grads, state

    return GradientTransformation(lambda params: EmptyState(), update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states.

    Example::

        opt = chain(clip_by_global_norm(10.0), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(
                f"chain(*transforms): transforms[{i}] is a {type(t).__qualname__}, not a "
                "GradientTransformation; pass e.g. metafunc.optim.scale_by_adam()."
            )

    def init(params: Any) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(grads: Any, state: tuple[Any, ...], params: Any = None) -> tuple[Any, Any]:
        if len(state) != len(transforms):
            raise ValueError(
                f"chain.update: state has {len(state)} parts for {len(transforms)} transforms; "
                "build the state with this optimizer's init."
            )
        new_state = []
        for t, s in zip(transforms, state, strict=True):
            grads, s = t.update(grads, s, params)
            new_state.append(s)
        return grads, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Any, updates: Any) -> Any:
    """``params + updates`` leaf by leaf, out of place; updates are cast to each param's dtype."""
    mt.check_same_structure(
        "apply_updates(params, updates)", (params, updates), ("params", "updates")
    )
    return optree.tree_map(lambda p, u: p + u.to(p.dtype), params, updates)
