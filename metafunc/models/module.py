"""Any ``torch.nn.Module`` as a pure function, through ``torch.func.functional_call``."""

from __future__ import annotations

import contextvars
import copy
import threading
from typing import Any, cast

import torch
from torch import nn
from torch.func import functional_call

from metafunc.models.base import Model, Params, State, batch_norm, default_generator

__all__ = ["FunctionalBatchNorm", "FunctionalLayerNorm", "from_module"]

# Collects the running statistics the converted batch norms compute during one ``apply`` call;
# ``None`` outside a stateful call (then batch norms use batch statistics and record nothing).
_UPDATES: contextvars.ContextVar[dict[str, torch.Tensor] | None] = contextvars.ContextVar(
    "metafunc_bn_updates", default=None
)

# Layers that call F.batch_norm / F.instance_norm inside and have not been verified under vmap.
_REFUSED = (nn.modules.instancenorm._InstanceNorm,)


class FunctionalBatchNorm(nn.Module):
    """Drop-in replacement for ``nn.BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) built on
    :func:`metafunc.models.batch_norm`, which has exact second-order gradients under ``vmap``.

    Keeps the original parameter and buffer names (``weight``, ``bias``, ``running_mean``,
    ``running_var``) so state dicts load unchanged.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, path: str) -> None:
        super().__init__()
        if bn.momentum is None:
            raise ValueError(
                f"from_module(module): {path} is a {type(bn).__name__} with momentum=None "
                "(cumulative averaging), which needs an integer step buffer torch.func cannot "
                f"carry. Set module.{path}.momentum = 0.1 (or another float) first."
            )
        self.path = path
        self.eps = bn.eps
        self.momentum = float(bn.momentum)
        self.weight = bn.weight
        self.bias = bn.bias
        self.track = bn.track_running_stats
        if self.track:
            self.register_buffer("running_mean", bn.running_mean)
            self.register_buffer("running_var", bn.running_var)
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        updates = _UPDATES.get()
        if updates is None or not self.track:
            y, _, _ = batch_norm(x, self.weight, self.bias, eps=self.eps)
            return y
        y, mean, var = batch_norm(
            x,
            self.weight,
            self.bias,
            cast(torch.Tensor, self.running_mean),
            cast(torch.Tensor, self.running_var),
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
        )
        assert mean is not None and var is not None
        prefix = f"{self.path}." if self.path else ""
        updates[f"{prefix}running_mean"] = mean
        updates[f"{prefix}running_var"] = var
        return y


class FunctionalLayerNorm(nn.Module):
    """Drop-in replacement for ``nn.LayerNorm`` written from primitive ops: ``F.layer_norm``
    gives wrong second-order gradients under ``vmap`` on torch 2.14 (about 2% relative error in
    metafunc's tests), this is exact. Keeps the parameter names ``weight`` and ``bias``."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.dims = tuple(range(-len(ln.normalized_shape), 0))
        self.eps = ln.eps
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=self.dims, keepdim=True)
        var = x.var(dim=self.dims, correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def _replacement(sub: nn.Module, path: str, convert: bool) -> nn.Module | None:
    """The exact replacement for ``sub``, ``None`` to keep it, or an error to refuse it."""
    where = path or "the module"
    if isinstance(sub, _REFUSED):
        raise TypeError(
            f"from_module(module): {where} is a {type(sub).__name__}, which runs "
            "F.instance_norm / F.batch_norm inside and is not verified to give correct "
            "second-order gradients under vmap. Replace it, e.g. with nn.GroupNorm("
            "num_channels, num_channels), which metafunc tests under vmap."
        )
    is_bn = isinstance(sub, nn.modules.batchnorm._BatchNorm)
    is_ln = isinstance(sub, nn.LayerNorm)
    if not (is_bn or is_ln):
        return None
    if not convert:
        raise ValueError(
            f"from_module(module, convert_norms=False): {where} is a {type(sub).__name__}; "
            "F.batch_norm and F.layer_norm give wrong second-order gradients under "
            "torch.func.vmap on this torch (functorch#534). Pass convert_norms=True (the "
            "default) to replace them with metafunc's exact versions."
        )
    if is_ln and type(sub) is not nn.LayerNorm:
        raise TypeError(
            f"from_module(module): {where} is a {type(sub).__name__}, a subclass of LayerNorm "
            "with its own forward, which metafunc cannot convert safely (F.layer_norm is wrong "
            "for second order under vmap). Replace it with a module that normalises with "
            "primitive ops (mean, var, rsqrt)."
        )
    if is_bn:
        return FunctionalBatchNorm(cast(nn.modules.batchnorm._BatchNorm, sub), path)
    return FunctionalLayerNorm(cast(nn.LayerNorm, sub))


def _convert(module: nn.Module, convert: bool) -> nn.Module:
    """Replace every batch and layer norm in ``module`` (a private copy) by an exact one."""
    top = _replacement(module, "", convert)
    if top is not None:
        return top
    for path, sub in list(module.named_modules()):
        new = _replacement(sub, path, convert) if path else None
        if new is not None:
            parent_path, _, child = path.rpartition(".")
            parent = module.get_submodule(parent_path) if parent_path else module
            setattr(parent, child, new)
    return module


def from_module(module: nn.Module, *, convert_norms: bool = True, head: str | None = None) -> Model:
    """Turn ``module`` into a :class:`Model`: parameters and buffers become explicit trees.

    ``params`` is ``dict(module.named_parameters())``; the state is the floating-point buffers
    (batch-norm running statistics), passed in and returned. The module is deep-copied, and each
    thread that applies the model calls its own copy of that (so tasks may run on several
    threads at once, ``strategy='threads'``); the given module's tensors are never modified.
    Batch norms and layer norms are replaced with metafunc's exact versions (``F.batch_norm`` and
    ``F.layer_norm`` give wrong second-order gradients under ``vmap``); instance norms are
    refused. Other layers are used as they are: a custom module that calls ``F.batch_norm``
    itself is not detected, so compare strategies with :func:`metafunc.check_strategies` before
    trusting a new architecture under ``vmap``.

    ``init(generator)`` re-initialises every submodule that has ``reset_parameters`` from a seed
    drawn from ``generator``; ``init()`` without a generator returns a copy of the module's current
    parameters (e.g. pretrained weights); ``dtype=None`` keeps the module's dtype.
    ``apply(params, x, state=None, training=True)``: without
    state, batch norms use batch statistics (MAML's setting); with state they use and update the
    running statistics as ``nn.BatchNorm`` does in train/eval mode. Dropout follows ``training``
    (under ``vmap`` that needs ``randomness='different'``).

    Example::

        model = from_module(torchvision.models.resnet18(num_classes=5), head="fc")
        params = model.init()
        logits = model.apply(params, images)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"from_module(module): expected a torch.nn.Module, got {type(module).__qualname__}."
        )
    net = _convert(copy.deepcopy(module), convert_norms)
    template_params = {k: v.detach() for k, v in net.named_parameters()}
    template_state = {k: v.detach() for k, v in net.named_buffers() if v.is_floating_point()}
    if head is not None and not any(k.startswith(head + ".") for k in template_params):
        raise ValueError(
            f"from_module(head={head!r}): no parameter starts with {head + '.'!r}; parameters: "
            f"{list(template_params)[:8]}."
        )

    def init_fn(
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Params:
        if generator is None:
            source = template_params
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=default_generator(generator)))
            fresh = copy.deepcopy(net).cpu()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for sub in fresh.modules():
                    reset = getattr(sub, "reset_parameters", None)
                    if callable(reset):
                        reset()
            source = {k: v.detach() for k, v in fresh.named_parameters()}
        return {k: v.detach().clone().to(dtype=dtype, device=device) for k, v in source.items()}

    def init_state(
        *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> State:
        return {k: v.clone().to(dtype=dtype, device=device) for k, v in template_state.items()}

    per_thread = threading.local()

    def own_module() -> nn.Module:
        # functional_call swaps the parameters into the module and train() sets its mode, so
        # every thread (e.g. the 'threads' task strategy's workers) calls its own copy of `net`,
        # which itself is only ever copied
        mine = getattr(per_thread, "net", None)
        if mine is None:
            mine = per_thread.net = copy.deepcopy(net)
        return mine

    def apply(params: Params, x: Any, *, state: State | None = None, training: bool = True) -> Any:
        mine = own_module()
        mine.train(training)
        if state is None:
            return functional_call(mine, params, (x,))
        updates: dict[str, torch.Tensor] = {}
        token = _UPDATES.set(updates)
        try:
            y = functional_call(mine, (params, state), (x,))
        finally:
            _UPDATES.reset(token)
        return y, {k: updates.get(k, v) for k, v in state.items()}

    return Model(
        init_fn,
        apply,
        init_state,
        features=None,
        head=head,
        name=f"from_module({type(module).__name__})",
    )
