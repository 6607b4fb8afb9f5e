"""Differentiable functional optimizers (optax-style): ``init(params) -> state`` and
``update(grads, state, params) -> (updates, state)``, always out of place."""

from metafunc.optim import schedules
from metafunc.optim.alias import adam, adamw, sgd
from metafunc.optim.base import EmptyState, GradientTransformation, apply_updates, chain, identity
from metafunc.optim.transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    TraceState,
    add_decayed_weights,
    clip_by_global_norm,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "TraceState",
    "adam",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "identity",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "schedules",
    "sgd",
    "trace",
]
