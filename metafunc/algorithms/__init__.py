"""Meta-learning algorithms, each a small composition of the functional core."""

from metafunc.algorithms.anil import ANIL
from metafunc.algorithms.base import Algorithm, evaluate_predictions, tune_strategy
from metafunc.algorithms.baseline import Baseline, load_weights, pretrain_batch
from metafunc.algorithms.heads import R2D2, MetaOptNet, ridge_logits, svm_logits
from metafunc.algorithms.imaml import IMAML
from metafunc.algorithms.maml import MAML, FirstOrderMAML, MetaSGD
from metafunc.algorithms.mamlpp import MAMLPlusPlus
from metafunc.algorithms.protonets import ProtoNet, prototype_logits
from metafunc.algorithms.reptile import Reptile

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "R2D2",
    "Algorithm",
    "Baseline",
    "FirstOrderMAML",
    "MAMLPlusPlus",
    "MetaOptNet",
    "MetaSGD",
    "ProtoNet",
    "Reptile",
    "evaluate_predictions",
    "load_weights",
    "pretrain_batch",
    "prototype_logits",
    "ridge_logits",
    "svm_logits",
    "tune_strategy",
]
