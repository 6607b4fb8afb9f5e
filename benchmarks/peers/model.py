"""MAML's conv4, as an ``nn.Module`` and as a pure function of a flat parameter dict.

Parameter names and order (``param_names``) are fixed by the protocol::

    conv0.weight [hidden, channels, 3, 3]   conv0.bias [hidden]
    bn0.weight   [hidden]                   bn0.bias   [hidden]
    ... conv1.*, bn1.*, conv2.*, bn2.*, conv3.* (in = hidden), bn3.* ...
    head.weight  [ways, features]           head.bias  [ways]

Each block is conv3x3 (bias, padding 1) -> batch norm -> ReLU (-> 2x2 max-pool). Batch norm always
normalises with the statistics of the batch it sees (transductive; no running statistics, eps
``BN_EPS``). ``pooling="stride"``: stride-2 convs, then a global average pool over the spatial dims
(``features = hidden``); ``pooling="maxpool"``: stride-1 convs, a 2x2 max-pool per block, then
flatten (``features = hidden * (image_size // 16)**2`` for image sizes divisible down by 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.peers.spec import Spec

__all__ = [
    "BN_EPS",
    "Conv4",
    "batch_norm_primitive",
    "batch_norm_torch",
    "conv4_apply",
    "feature_size",
    "load_init",
    "param_names",
    "param_shapes",
]

BN_EPS = 1e-5
BatchNormFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def feature_size(spec: Spec) -> int:
    """Width of the features that enter the linear head."""
    if spec.pooling == "stride":
        return spec.hidden
    size = spec.image_size
    for _ in range(4):
        size //= 2
    return spec.hidden * size * size


def param_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the protocol's order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(4):
        cin = spec.channels if i == 0 else spec.hidden
        shapes[f"conv{i}.weight"] = (spec.hidden, cin, 3, 3)
        shapes[f"conv{i}.bias"] = (spec.hidden,)
        shapes[f"bn{i}.weight"] = (spec.hidden,)
        shapes[f"bn{i}.bias"] = (spec.hidden,)
    shapes["head.weight"] = (spec.ways, feature_size(spec))
    shapes["head.bias"] = (spec.ways,)
    return shapes


def param_names(spec: Spec) -> list[str]:
    """The protocol's parameter names, in order."""
    return list(param_shapes(spec))


def batch_norm_torch(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Batch norm with batch statistics through ``F.batch_norm(training=True)``."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=BN_EPS)


def batch_norm_primitive(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The same batch norm from mean / biased var / rsqrt, so its gradients are right under vmap.

    ``F.batch_norm`` inside ``torch.func.vmap`` gives wrong second-order gradients on torch 2.14.1
    (pytorch/functorch#534); these primitive ops batch and differentiate correctly.
    """
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    xhat = (x - mean) * torch.rsqrt(var + BN_EPS)
    return xhat * weight[None, :, None, None] + bias[None, :, None, None]


def conv4_apply(
    params: dict[str, Tensor],
    x: Tensor,
    *,
    pooling: str,
    batch_norm: BatchNormFn = batch_norm_torch,
) -> Tensor:
    """Logits of conv4 for images ``x: [B, C, H, W]`` under the flat parameter dict ``params``."""
    stride = 2 if pooling == "stride" else 1
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
        x = F.relu(batch_norm(x, params[f"bn{i}.weight"], params[f"bn{i}.bias"]))
        if pooling == "maxpool":
            x = F.max_pool2d(x, 2)
    x = x.mean(dim=(2, 3)) if pooling == "stride" else x.flatten(1)
    return F.linear(x, params["head.weight"], params["head.bias"])


class _PrimitiveBatchNorm2d(nn.Module):
    """``nn.BatchNorm2d(track_running_stats=False)`` written with ``batch_norm_primitive``."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm_primitive(x, self.weight, self.bias)


class Conv4(nn.Module):
    """conv4 as a module whose ``named_parameters()`` are exactly ``param_names(spec)``, in order.

    ``primitive_bn=True`` swaps ``nn.BatchNorm2d`` for the primitive-op batch norm (same parameters,
    same values), for use under ``torch.func.vmap``.
    """

    def __init__(self, spec: Spec, *, primitive_bn: bool = False) -> None:
        super().__init__()
        self.pooling = spec.pooling
        stride = 2 if spec.pooling == "stride" else 1
        for i in range(4):
            cin = spec.channels if i == 0 else spec.hidden
            self.add_module(f"conv{i}", nn.Conv2d(cin, spec.hidden, 3, stride, 1, bias=True))
            bn: nn.Module = (
                _PrimitiveBatchNorm2d(spec.hidden)
                if primitive_bn
                else nn.BatchNorm2d(spec.hidden, eps=BN_EPS, track_running_stats=False)
            )
            self.add_module(f"bn{i}", bn)
        self.head = nn.Linear(feature_size(spec), spec.ways)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(4):
            x = getattr(self, f"conv{i}")(x)
            x = F.relu(getattr(self, f"bn{i}")(x))
            if self.pooling == "maxpool":
                x = F.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3)) if self.pooling == "stride" else x.flatten(1)
        return self.head(x)

    @classmethod
    def from_init(cls, spec: Spec, init: dict[str, Tensor], *, primitive_bn: bool = False) -> Conv4:
        """A module on ``init``'s device and dtype holding exactly the tensors of ``init``."""
        ref = init["head.weight"]
        model = cls(spec, primitive_bn=primitive_bn).to(device=ref.device, dtype=ref.dtype)
        model.load_state_dict(init, strict=True)
        return model


def load_init(spec: Spec, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Read the init file (a ``torch.save``d flat dict) and check it against ``param_shapes``.

    Returns fresh tensors on ``device`` in ``dtype``, in the protocol's order, not requiring grad.
    """
    raw = torch.load(spec.init_path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise TypeError(f"load_init: {spec.init_path} holds {type(raw).__name__}, not a dict.")
    shapes = param_shapes(spec)
    if list(raw) != list(shapes):
        raise ValueError(
            f"load_init: {spec.init_path} has names {list(raw)}; the spec needs {list(shapes)} "
            "in that order. Write it with benchmarks.peers.inputs.make_inputs(spec, seed)."
        )
    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if tuple(raw[name].shape) != shape:
            raise ValueError(
                f"load_init: {spec.init_path}[{name!r}] has shape {tuple(raw[name].shape)}; "
                f"the spec needs {shape}."
            )
        out[name] = raw[name].to(device=device, dtype=dtype).clone()
    return out
