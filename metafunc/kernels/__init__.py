"""CPU kernels for the convolution and batch norm of :mod:`metafunc.models`: the reference
layers' values, computed faster on the CPU.

A model takes them by one explicit option, ``conv4(kernels='cpu')`` and
``resnet12(kernels='cpu')`` (the default, ``'reference'``, is the plain layers of
:mod:`metafunc.models.base` on every device); ``metafunc train --kernels auto`` sets it from
the run's device. So a model reads as its network, and the device-specific code (custom autograd
functions and layout heuristics here, allocator and thread settings in :mod:`metafunc.cpu`)
lives in one place, as TorchOpt's optimizers take ``use_accelerated_op``.

- :func:`conv2d` convolves a CPU pass of at least :data:`CHANNELS_LAST_MIN_PIXELS` pixels in
  channels-last memory format, where oneDNN is faster, and where autograd records the call,
  gives it a double backward on oneDNN's forward and backward kernels.
- :func:`batch_norm` normalises a channels-last CPU activation as the ``[pixels, channels]``
  matrix it is in memory, with statistics summed pairwise (the default layout's float32
  accuracy) and a closed-form double backward.

Each is the reference layer wherever it does not apply: off the CPU (so ``'cpu'`` is a no-op on
CUDA), inside ``torch.func`` transforms and ``torch.compile`` (which pick their own layouts),
and for the convolution under autocast. Values are the reference's up to float rounding; the
tests compare outputs, running statistics and second-order meta-gradients in float64, and
three orders of gradients of each layer. Measurements: benchmarks/HISTORY.md
("Channels-last convolutions", "The convolutions' double backward").
"""

from metafunc.kernels.conv import conv2d
from metafunc.kernels.layout import CHANNELS_LAST_MIN_PIXELS, to_channels_last
from metafunc.kernels.norm import batch_norm, column_sum

__all__ = ["CHANNELS_LAST_MIN_PIXELS", "batch_norm", "column_sum", "conv2d", "to_channels_last"]
