"""The inner loop, once: ``adapt`` builds a pure function ``(params, batch) -> (adapted_params,
metrics)`` that takes ``steps`` differentiable optimizer steps on ``loss_fn`` with
``torch.func.grad``. Differentiating its output with respect to ``params`` (by ``torch.autograd``
or ``torch.func.grad``) gives the second-order meta-gradient; ``first_order=True`` detaches the
inner gradients. Many tasks go through it at once by :func:`metafunc.task_map`
(:mod:`metafunc.strategies`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from metafunc import tree as mt
from metafunc._transforms import any_transform
from metafunc.data.batch import TaskBatch, check_batch, in_checked_scope
from metafunc.optim.base import GradientTransformation, apply_updates

__all__ = ["adapt", "grad_with_aux"]


def _scalar(call: str, loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{call}: loss_fn returned a {type(loss).__qualname__}; it must return a scalar tensor."
        )
    if loss.dim() != 0:
        raise ValueError(
            f"{call}: loss_fn returned a tensor of shape {tuple(loss.shape)}; it must return a "
            "scalar (one task's loss). Reduce it, e.g. with .mean()."
        )
    return loss


def grad_with_aux(
    fn: Callable[..., tuple[torch.Tensor, Any]], tree: Any, *args: Any, differentiable: bool = True
) -> tuple[Any, Any]:
    """``torch.func.grad(fn, has_aux=True)(tree, *args)`` for ``fn(tree, *args) -> (scalar,
    aux)``: the gradient with respect to ``tree`` and ``aux``.

    Inside a ``torch.func`` transform (and while ``torch.compile`` traces) by ``torch.func.grad``;
    otherwise by ``torch.autograd.grad`` on the leaves themselves where grad mode is on and they
    require grad (so the gradient is differentiable with respect to whatever they came from, as
    ``torch.func.grad``'s is) and on detached copies of the others. The same gradient, bit for
    bit, with one autograd level fewer and less Python work (less time holding the GIL, which
    the ``'threads'`` strategy's tasks contend for; measurements: HISTORY "grad_with_aux as the
    inner step"). ``differentiable=False`` builds no graph of the gradient (for first-order
    methods, which detach it anyway); leaves ``fn`` does not use get zeros.
    """
    if any_transform():
        return torch.func.grad(fn, has_aux=True)(tree, *args)
    leaves, spec = optree.tree_flatten(tree)
    outer = torch.is_grad_enabled()
    inputs = [x if outer and x.requires_grad else x.detach().requires_grad_() for x in leaves]
    connected = differentiable and any(x is y for x, y in zip(inputs, leaves, strict=True))
    with torch.enable_grad():
        loss, aux = fn(spec.unflatten(inputs), *args)
        found = torch.autograd.grad(loss, inputs, create_graph=connected, allow_unused=True)
    # contiguous: a convolution on channels-last input returns its weight's gradient
    # channels-last-strided (metafunc.kernels.conv2d on the CPU)
    grads = [
        torch.zeros_like(x) if g is None else g.contiguous()
        for x, g in zip(leaves, found, strict=True)
    ]
    return spec.unflatten(grads), aux


def adapt(
    loss_fn: Callable[..., Any],
    optimizer: GradientTransformation,
    steps: int,
    *,
    first_order: bool = False,
    trainable: mt.PathFilter | None = None,
    stateful: bool = False,
    observe: Callable[..., torch.Tensor] | None = None,
) -> Callable[..., Any]:
    """Build the inner loop of one task.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``; with ``stateful=True``,
            ``loss_fn(params, batch, state, step) -> (scalar, new_state)``, where ``state`` is
            e.g. batch-norm running statistics and ``step`` the inner step (an ``int``).
        optimizer: a differentiable optimizer, e.g. ``metafunc.optim.sgd(0.4)``; its state is
            created fresh from the adapted leaves on every call.
        steps: number of inner steps (``0`` returns ``params`` unchanged).
        first_order: detach the inner gradients (first-order MAML); gradients still flow along
            the direct path from ``params`` and through tensor hyper-parameters of ``optimizer``.
        trainable: which leaves adapt (``tree.partition`` filter, e.g. ``'head'`` for ANIL); the
            others are held fixed in the inner loop but still receive meta-gradients.
        stateful: thread a state through ``loss_fn`` (see above).
        observe: ``observe(params, batch) -> tensor`` (stateful: ``observe(params, batch, state,
            step)``), evaluated at the initial and at every adapted point and returned stacked
            as ``metrics['observed']`` (``steps + 1`` entries), differentiable. Use it for
            MAML++'s multi-step loss or to evaluate after 0..k steps in one pass.

    Returns:
        ``run(params, batch) -> (adapted_params, metrics)``, or with ``stateful=True``
        ``run(params, batch, state) -> (adapted_params, new_state, metrics)``. ``metrics['loss']``
        holds the detached support loss before each step (``steps`` entries).

        ``run(params, batch, first=(grads, loss))`` takes the first step with ``grads`` (the
        gradient of ``loss_fn`` at ``params``, for the adapted leaves) and ``loss`` (its value)
        computed elsewhere, e.g. for many tasks at once: every task starts from the same
        ``params``, so :class:`metafunc.algorithms.MAML` computes all their first gradients in
        one ``vmap`` on the per-task strategies. Gradients flow into ``grads`` as into any input.
        Not with ``stateful=True`` (the first step's new state would be lost) or ``steps=0``.

    Example (MAML's inner loop)::

        def loss_fn(params, task):
            return F.cross_entropy(model.apply(params, task.support_x), task.support_y)

        inner = adapt(loss_fn, metafunc.optim.sgd(0.4), steps=1)
        adapted, metrics = inner(params, task)
    """
    call = "adapt(loss_fn, optimizer, steps)"
    if not callable(loss_fn):
        raise TypeError(f"{call}: loss_fn is a {type(loss_fn).__qualname__}, not a callable.")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(
            f"{call}: optimizer is a {type(optimizer).__qualname__}; pass a "
            "GradientTransformation such as metafunc.optim.sgd(0.01)."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{call}: steps must be an int >= 0, got {steps!r}.")
    if observe is not None and not callable(observe):
        raise TypeError(f"{call}: observe must be callable or None.")

    def run(params: Any, batch: Any, state: Any = None, *, first: Any = None) -> Any:
        mt.validate(params, call="adapt(...)(params, batch)")
        if isinstance(batch, TaskBatch) and not in_checked_scope():  # one task: no task axis
            check_batch(batch, call="adapt(...)(params, batch)", tasks=False)
        if stateful and state is None:
            raise ValueError(
                "adapt(..., stateful=True)(params, batch, state): state is missing; pass e.g. "
                "model.init_state()."
            )
        if trainable is not None:
            fast, frozen, spec = mt.partition(params, trainable)
        else:
            fast, frozen, spec = params, None, None
        if first is not None:
            _check_first(first, fast, stateful=stateful, steps=steps)

        def full(f: Any) -> Any:
            return f if spec is None else mt.combine(f, frozen, spec)

        def step_loss(f: Any, st: Any, k: int) -> tuple[torch.Tensor, tuple[torch.Tensor, Any]]:
            if stateful:
                out = loss_fn(full(f), batch, st, k)
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"{call}: with stateful=True, loss_fn must return (loss, new_state)."
                    )
                loss, st = out
            else:
                loss = loss_fn(full(f), batch)
            loss = _scalar(call, loss)
            return loss, (loss.detach(), st)

        def look(f: Any, st: Any, k: int) -> torch.Tensor:
            assert observe is not None
            return observe(full(f), batch, st, k) if stateful else observe(full(f), batch)

        opt_state = optimizer.init(fast)
        losses: list[torch.Tensor] = []
        observed: list[torch.Tensor] = []
        st = state if stateful else {}
        for k in range(steps):
            if observe is not None:
                observed.append(look(fast, st, k))
            if k == 0 and first is not None:
                grads, loss = first
                loss = loss.detach()
            else:
                grads, (loss, st) = grad_with_aux(
                    step_loss, fast, st, k, differentiable=not first_order
                )
            if first_order:
                grads = mt.detach(grads)
            updates, opt_state = optimizer.update(grads, opt_state, fast)
            fast = apply_updates(fast, updates)
            losses.append(loss)
        metrics: dict[str, torch.Tensor] = {
            "loss": torch.stack(losses) if losses else torch.zeros(0, device=mt.device_of(params))
        }
        if observe is not None:
            observed.append(look(fast, st, steps))
            metrics["observed"] = torch.stack(observed)
        adapted = full(fast)
        return (adapted, st, metrics) if stateful else (adapted, metrics)

    return run


def _check_first(first: Any, fast: Any, *, stateful: bool, steps: int) -> None:
    call = "adapt(...)(params, batch, first=(grads, loss))"
    if stateful or steps == 0:
        why = "stateful=True (the first step's new state would be lost)" if stateful else "steps=0"
        raise ValueError(f"{call}: first is not supported with {why}; leave first=None.")
    if not (isinstance(first, tuple) and len(first) == 2):
        raise TypeError(f"{call}: first must be a pair (grads, loss), got {type(first).__name__}.")
    grads, loss = first
    if mt.structure(grads) != mt.structure(fast):
        raise ValueError(
            f"{call}: grads has leaves {mt.paths(grads)} but the adapted leaves are "
            f"{mt.paths(fast)}; pass the gradient of exactly the leaves that adapt."
        )
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"{call}: loss must be a scalar tensor (the support loss at params).")
