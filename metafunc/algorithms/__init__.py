"""Meta-learning algorithms, each a small composition of the functional core."""

from metafunc.algorithms.base import Algorithm, evaluate_predictions
from metafunc.algorithms.maml import ANIL, MAML, FirstOrderMAML, MetaSGD
from metafunc.algorithms.mamlpp import MAMLPlusPlus

__all__ = [
    "ANIL",
    "MAML",
    "Algorithm",
    "FirstOrderMAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "evaluate_predictions",
]
