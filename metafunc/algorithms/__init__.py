"""Meta-learning algorithms, each a small composition of the functional core."""

from metafunc.algorithms.base import Algorithm, evaluate_predictions
from metafunc.algorithms.maml import ANIL, MAML, FirstOrderMAML, MetaSGD

__all__ = [
    "ANIL",
    "MAML",
    "Algorithm",
    "FirstOrderMAML",
    "MetaSGD",
    "evaluate_predictions",
]
