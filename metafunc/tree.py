"""Pytree utilities on optree: the one tree namespace of metafunc.

Parameters, gradients, optimizer states and task batches are pytrees: nested dicts, lists, tuples
and NamedTuples whose leaves are tensors. Everything here is out-of-place and differentiable.

Paths name leaves in error messages and in partitions: dict keys and sequence indices (NamedTuple
fields by position) joined with dots, so a flat ``{'head.weight': w}`` dict and a nested
``{'head': {'weight': w}}`` both name ``w`` as ``'head.weight'``.
"""

from __future__ import annotations

import re
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeAlias

import optree
import torch
from optree import PyTreeSpec

__all__ = [
    "PathFilter",
    "PyTree",
    "add",
    "allclose",
    "axpy",
    "cast",
    "combine",
    "detach",
    "device_of",
    "flatten_with_paths",
    "global_norm",
    "leaves",
    "map",
    "ones_like",
    "partition",
    "paths",
    "scale",
    "select",
    "stack",
    "structure",
    "sub",
    "unstack",
    "validate",
    "vdot",
    "zeros_like",
]

PyTree: TypeAlias = Any
"""A nested dict/list/tuple/NamedTuple of tensors."""

PathFilter: TypeAlias = (
    "Callable[[str, torch.Tensor], bool] | str | re.Pattern[str] | Collection[str]"
)
"""Selects leaves: a predicate ``(path, leaf) -> bool``; a path string, which selects that leaf
or the whole subtree under it (``'head'`` selects ``'head.weight'`` and ``'head.bias'``); a compiled
regular expression matched against the whole path; or a collection of path strings."""


def _path_str(path: Sequence[Any]) -> str:
    return ".".join(str(k) for k in path)


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``optree.tree_map`` with metafunc's conventions (``None`` is an empty node)."""
    return optree.tree_map(fn, tree, *rest)


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in flattening order."""
    return optree.tree_leaves(tree)


def structure(tree: PyTree) -> PyTreeSpec:
    """The structure (treedef) of ``tree``."""
    return optree.tree_structure(tree)


def paths(tree: PyTree) -> list[str]:
    """Dotted path of every leaf, in flattening order."""
    return [_path_str(p) for p in optree.tree_paths(tree)]


def device_of(tree: PyTree) -> torch.device:
    """The device of ``tree``'s first leaf (the CPU for a tree without leaves)."""
    found = optree.tree_leaves(tree)
    return found[0].device if found else torch.device("cpu")


def flatten_with_paths(tree: PyTree) -> dict[str, Any]:
    """A flat ``{dotted_path: leaf}`` dict (the layout of a ``state_dict`` or safetensors file)."""
    path_list, leaf_list, _ = optree.tree_flatten_with_path(tree)
    flat: dict[str, Any] = {}
    for p, leaf in zip(path_list, leaf_list, strict=True):
        key = _path_str(p)
        if key in flat:
            raise ValueError(
                f"tree.flatten_with_paths(tree): two leaves have the path {key!r} (a dotted key "
                "such as 'head.weight' next to a nested {'head': {'weight': ...}}); rename one."
            )
        flat[key] = leaf
    return flat


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_CONTAINERS = (dict, OrderedDict, defaultdict, list, tuple)


class _Field(str):
    """A NamedTuple field in a validation path: written ``.field``, not ``[index]``."""


def _format_path(name: str, path: Sequence[Any]) -> str:
    out = name
    for key in path:
        out += f".{key}" if isinstance(key, _Field) else f"[{key!r}]"
    return out


def validate(
    tree: PyTree,
    *,
    call: str,
    name: str = "params",
    floating: bool = True,
    device: bool = True,
) -> None:
    """Check that ``tree`` is something ``torch.func`` can transform, or raise naming the bad leaf.

    ``torch.func`` flattens with torch's own pytree registry and needs every leaf to be a tensor;
    a ``None`` leaf or a container only optree knows about fails deep inside with "Thing passed to
    transform API must be Tensor". This walks the tree the way torch does (dict, list, tuple,
    NamedTuple) and reports the first problem by path.

    Args:
        tree: the tree to check.
        call: the public call doing the check, quoted at the start of the message.
        name: what the tree is called in the message (``params``, ``grads``...).
        floating: require floating-point (or complex) leaves, as differentiation needs.
        device: require every leaf on one device.

    Raises:
        TypeError: a leaf that is not a tensor, a non-floating tensor, or an unknown container.
        ValueError: leaves on different devices, or an empty tree.
    """
    if torch.compiler.is_compiling():  # checked eagerly at the compiled function's boundary
        return
    if _fast_valid(tree, floating=floating, device=device):
        return
    seen_device: list[tuple[str, torch.device]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        where = _format_path(name, path)
        if isinstance(node, torch.Tensor):
            if floating and not (node.is_floating_point() or node.is_complex()):
                raise TypeError(
                    f"{call}: {where} is a {node.dtype} tensor; only floating tensors can be "
                    f"differentiated. Cast it, e.g. "
                    f"{name} = metafunc.tree.cast({name}, torch.float32, floating_only=False), "
                    f"or keep integer data out of the tree that is differentiated."
                )
            if device:
                if seen_device and node.device != seen_device[0][1]:
                    first, dev = seen_device[0]
                    raise ValueError(
                        f"{call}: {where} is on {node.device} but {first} is on {dev}; all "
                        f"leaves must be on one device. Move the tree with "
                        f"metafunc.tree.cast({name}, device={str(dev)!r})."
                    )
                if not seen_device:
                    seen_device.append((where, node.device))
            return
        if node is None:
            raise TypeError(
                f"{call}: {where} is None; torch.func needs every leaf to be a tensor. Remove "
                f"the entry (or replace it with a tensor) before calling {call.split('(')[0]}."
            )
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise TypeError(f"{call}: {where} has a non-string key {key!r}; use str keys.")
                walk(value, (*path, key))
            return
        if isinstance(node, _CONTAINERS):  # list, tuple and NamedTuple
            fields = getattr(node, "_fields", None)
            for i, value in enumerate(node):
                walk(value, (*path, i if fields is None else _Field(fields[i])))
            return
        raise TypeError(
            f"{call}: {where} is a {type(node).__qualname__}; torch.func only sees dict, list, "
            f"tuple and NamedTuple containers with tensor leaves. Convert it to a dict of tensors."
        )

    walk(tree, ())
    if floating and not optree.tree_leaves(tree):
        raise ValueError(f"{call}: {name} has no tensor leaves; there is nothing to differentiate.")
    if len(_VALID_SPECS) < 1024:
        _VALID_SPECS.add(optree.tree_structure(tree, none_is_leaf=True))


# structures a full walk of validate has accepted: a tree of one of them needs only its leaves
# checked (validate runs at every entry point, on the hot path)
_VALID_SPECS: set[PyTreeSpec] = set()


def _fast_valid(tree: PyTree, *, floating: bool, device: bool) -> bool:
    """Whether ``tree`` passes :func:`validate` for certain without the walk: its structure was
    accepted before and its leaves are tensors (floating ones, on one device, as asked)."""
    found, spec = optree.tree_flatten(tree, none_is_leaf=True)
    if not found or spec not in _VALID_SPECS:
        return False
    first = found[0].device if isinstance(found[0], torch.Tensor) else None
    for leaf in found:
        if not isinstance(leaf, torch.Tensor):
            return False
        if floating and not (leaf.is_floating_point() or leaf.is_complex()):
            return False
        if device and leaf.device != first:
            return False
    return True


#: Whether dynamo traces ``PyTreeSpec.__eq__``: torch 2.11 cannot ("Polyfill handler ... does
#: not have a traceable function"); 2.14.1 can.
_DYNAMO_TRACES_SPEC_EQ = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 14)


def check_same_structure(call: str, trees: Sequence[PyTree], names: Sequence[str]) -> None:
    if not _DYNAMO_TRACES_SPEC_EQ and torch.compiler.is_dynamo_compiling():
        return  # there, a mismatch still fails in the tree_map each caller runs after this
    first = optree.tree_structure(trees[0])
    for tree, tree_name in zip(trees[1:], names[1:], strict=True):
        other = optree.tree_structure(tree)
        if other != first:
            mine, theirs = set(paths(trees[0])), set(paths(tree))
            detail = ""
            if mine - theirs:
                detail += f" only in {names[0]}: {sorted(mine - theirs)[:5]};"
            if theirs - mine:
                detail += f" only in {tree_name}: {sorted(theirs - mine)[:5]};"
            raise ValueError(
                f"{call}: {names[0]} and {tree_name} have different structures;{detail or ''} "
                f"{first} vs {other}. Build both from the same params tree."
            )


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


def add(x: PyTree, y: PyTree) -> PyTree:
    """``x + y`` leaf by leaf."""
    check_same_structure("tree.add(x, y)", (x, y), ("x", "y"))
    return optree.tree_map(torch.add, x, y)


def sub(x: PyTree, y: PyTree) -> PyTree:
    """``x - y`` leaf by leaf."""
    check_same_structure("tree.sub(x, y)", (x, y), ("x", "y"))
    return optree.tree_map(torch.sub, x, y)


def scale(a: float | torch.Tensor, x: PyTree) -> PyTree:
    """``a * x`` for a scalar ``a``."""
    return optree.tree_map(lambda t: torch.mul(t, a), x)


def axpy(a: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y`` leaf by leaf."""
    check_same_structure("tree.axpy(a, x, y)", (x, y), ("x", "y"))
    return optree.tree_map(lambda u, v: a * u + v, x, y)


def vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """The inner product ``sum_leaves sum(x * y)`` as a 0-d tensor."""
    check_same_structure("tree.vdot(x, y)", (x, y), ("x", "y"))
    terms = leaves(optree.tree_map(lambda u, v: torch.sum(u * v), x, y))  # mismatch: raises
    if not terms:
        raise ValueError("tree.vdot(x, y): the trees have no leaves.")
    return torch.stack(terms).sum()


def global_norm(x: PyTree) -> torch.Tensor:
    """The L2 norm of all leaves together, as one 0-d tensor."""
    terms = [torch.sum(t * t) for t in leaves(x)]
    if not terms:
        raise ValueError("tree.global_norm(x): the tree has no leaves.")
    return torch.sqrt(torch.stack(terms).sum())


def zeros_like(x: PyTree) -> PyTree:
    """A tree of zeros shaped like ``x``."""
    return optree.tree_map(torch.zeros_like, x)


def ones_like(x: PyTree) -> PyTree:
    """A tree of ones shaped like ``x``."""
    return optree.tree_map(torch.ones_like, x)


def detach(x: PyTree) -> PyTree:
    """Every leaf detached from the autograd graph (first-order inner loops use this)."""
    return optree.tree_map(torch.Tensor.detach, x)


def cast(
    x: PyTree,
    dtype: torch.dtype | None = None,
    *,
    device: torch.device | str | None = None,
    floating_only: bool = True,
) -> PyTree:
    """Move every leaf to ``device`` and cast floating leaves to ``dtype``.

    With ``floating_only`` (the default) integer leaves keep their dtype, so a tree holding labels
    or step counters can be cast to ``float64`` safely.
    """

    def one(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and (t.is_floating_point() or not floating_only):
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return optree.tree_map(one, x)


def allclose(x: PyTree, y: PyTree, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Same structure and every leaf ``torch.allclose``."""
    if structure(x) != structure(y):
        return False
    return all(
        torch.allclose(u, v, rtol=rtol, atol=atol)
        for u, v in zip(leaves(x), leaves(y), strict=True)
    )


# --------------------------------------------------------------------------------------------
# Task axis
# --------------------------------------------------------------------------------------------


def stack(trees: Sequence[PyTree], dim: int = 0) -> PyTree:
    """Stack same-structured trees along a new leading (task) axis."""
    if len(trees) == 0:
        raise ValueError("tree.stack(trees): got an empty sequence; pass at least one tree.")
    check_same_structure(
        "tree.stack(trees)", list(trees), [f"trees[{i}]" for i in range(len(trees))]
    )
    return optree.tree_map(lambda *ts: torch.stack(ts, dim), *trees)


def unstack(tree: PyTree, dim: int = 0) -> list[PyTree]:
    """Split a tree with a leading task axis into a list of per-task trees."""
    flat, spec = optree.tree_flatten(tree)
    if not flat:
        return []
    sizes = {t.shape[dim] for t in flat}
    if len(sizes) != 1:
        raise ValueError(
            f"tree.unstack(tree): leaves have different sizes along dim {dim}: {sorted(sizes)}."
        )
    parts = [t.unbind(dim) for t in flat]
    return [optree.tree_unflatten(spec, list(col)) for col in zip(*parts, strict=True)]


# --------------------------------------------------------------------------------------------
# Partition and combine
# --------------------------------------------------------------------------------------------


def _as_predicate(where: PathFilter) -> Callable[[str, Any], bool]:
    if isinstance(where, re.Pattern):
        return lambda path, _leaf: where.fullmatch(path) is not None
    if isinstance(where, str):
        return lambda path, _leaf: path == where or path.startswith(where + ".")
    if callable(where):
        return where
    if isinstance(where, Collection):
        targets = list(where)
        return lambda path, _leaf: any(path == t or path.startswith(t + ".") for t in targets)
    raise TypeError(
        f"tree.partition(tree, where): where is a {type(where).__qualname__}; pass a predicate "
        "(path, leaf) -> bool, a path string, a compiled regex or a collection of paths."
    )


def select(tree: PyTree, where: PathFilter, *, call: str = "tree.select(tree, where)") -> list[str]:
    """The dotted paths of the leaves ``where`` selects, in flattening order.

    Raises ``ValueError`` listing the available paths when nothing is selected.
    """
    predicate = _as_predicate(where)
    flat = flatten_with_paths(tree)
    chosen = [p for p, leaf in flat.items() if predicate(p, leaf)]
    if not chosen:
        shown = ", ".join(list(flat)[:12]) + (" ..." if len(flat) > 12 else "")
        raise ValueError(
            f"{call}: {where!r} selects no leaf. Available paths: {shown}. Pass a path prefix "
            "such as 'head', a regex, or a predicate (path, leaf) -> bool."
        )
    return chosen


def partition(tree: PyTree, where: PathFilter) -> tuple[dict[str, Any], dict[str, Any], PyTreeSpec]:
    """Split ``tree`` into the leaves ``where`` selects and the rest.

    Both parts are flat ``{path: leaf}`` dicts, so either can be handed to ``torch.func`` on its
    own (no ``None`` placeholders). ``combine(selected, rest, spec)`` rebuilds the tree.

    Example (ANIL: adapt only the head)::

        head, body, spec = tree.partition(params, "head")
        full = tree.combine(head, body, spec)
    """
    chosen = set(select(tree, where, call="tree.partition(tree, where)"))
    flat = flatten_with_paths(tree)
    selected = {p: v for p, v in flat.items() if p in chosen}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    return selected, rest, structure(tree)


def combine(*parts_and_spec: Any) -> PyTree:
    """Inverse of :func:`partition`: ``combine(part_a, part_b, ..., spec) -> tree``."""
    *parts, spec = parts_and_spec
    # (dynamo traces optree's specs as objects of its own: checked eagerly only)
    if not torch.compiler.is_compiling() and not isinstance(spec, PyTreeSpec):
        raise TypeError(
            "tree.combine(*parts, spec): the last argument must be the spec that "
            f"tree.partition returned, got {type(spec).__qualname__}."
        )
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    order = [_path_str(p) for p in spec.paths()]
    missing = [p for p in order if p not in merged]
    if missing:
        raise ValueError(
            f"tree.combine(*parts, spec): no leaf for {missing[:5]}; pass every part that "
            "tree.partition returned."
        )
    return optree.tree_unflatten(spec, [merged[p] for p in order])
