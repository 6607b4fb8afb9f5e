"""Models as pure functions: ``init(generator) -> params``, ``apply(params, x) -> y``."""

from metafunc.models.base import Model, Params, State, batch_norm
from metafunc.models.conv4 import conv4
from metafunc.models.mlp import mlp
from metafunc.models.module import FunctionalBatchNorm, FunctionalLayerNorm, from_module
from metafunc.models.resnet12 import resnet12

__all__ = [
    "FunctionalBatchNorm",
    "FunctionalLayerNorm",
    "Model",
    "Params",
    "State",
    "batch_norm",
    "conv4",
    "from_module",
    "mlp",
    "resnet12",
]
