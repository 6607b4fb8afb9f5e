"""Data-parallel meta-training on ``torch.distributed``: one process per GPU (or CPU), launched by
``torchrun``; NCCL between GPUs, gloo between CPUs.

Meta-learning parallelises over tasks. With ``W`` ranks and a global meta-batch of ``T`` tasks,
rank ``r`` adapts its contiguous share of the tasks (:func:`split_sizes`: the first ``T % W``
ranks take one task more) with the algorithm's ordinary task-batched ``meta_grad``, which returns
the mean over its ``n_r`` tasks. :func:`all_reduce_mean` with ``weight=n_r`` then gives every rank

.. math::  g = \\frac{\\sum_r n_r \\, g_r}{\\sum_r n_r} = \\frac{1}{T} \\sum_{t=1}^{T} g_t,

the single-process meta-gradient, also when the split is uneven; every rank applies the same
outer update, so the parameters stay identical (:func:`assert_in_sync` checks it).

Where the tasks come from: every rank draws the *whole* global meta-batch from the same generator,
seeded exactly as one process is, and keeps its own slice (:func:`split_batch`). Drawing tasks is
a few tensor ops, cheap next to adapting them; in exchange the run is reproducible for a given
world size *and independent of it*: 2 ranks with meta-batch 8 train on the same tasks, and reach
the same meta-parameters (to rounding), as 1 process with meta-batch 8, and a checkpoint written
by one world size resumes on another. (Seeding each rank from ``(seed, rank, step)`` would also be
reproducible, but only for one world size.)

A researcher's own loop adds four lines (join the group, keep this rank's tasks, average,
leave together)::

    import metafunc as mf
    import metafunc.distributed as mfd

    context = mfd.init_from_env()  # joins torchrun's group (None when not under torchrun)
    for step in range(steps):
        batch = sampler.sample(meta_batch, generator)  # the same generator seed on every rank
        local = mfd.split_batch(batch)  # this rank's tasks
        grads, loss, metrics = alg.meta_grad(meta, local)
        grads = mfd.all_reduce_mean(grads, weight=local.num_tasks)
        updates, state = opt.update(grads, state, meta)
        meta = mf.optim.apply_updates(meta, updates)
    mfd.shutdown(context)  # all ranks together

Start every rank from the same ``meta`` (the same init seed, or ``mfd.broadcast_tree(meta)``).
This module loads on first use (``mf.distributed``), so ``import metafunc`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import optree
import torch

from metafunc import tree as mt

__all__ = [
    "BUCKET_BYTES",
    "Context",
    "all_gather_object",
    "all_reduce_mean",
    "assert_in_sync",
    "assert_same",
    "broadcast_object",
    "broadcast_tree",
    "init_from_env",
    "is_initialized",
    "local_slice",
    "rank",
    "shutdown",
    "split_batch",
    "split_sizes",
    "tree_digest",
    "world_size",
]

BUCKET_BYTES = 128 * 2**20
"""Largest flat buffer one collective sends (128 MiB): a tree is flattened into as few buffers as
its devices, dtypes and this cap allow, one collective each."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class Context:
    """Where this process stands in the process group.

    ``owns_group``: :func:`init_from_env` created the group (so its caller should end it with
    :func:`shutdown`);
    ``False`` when the group already existed.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owns_group: bool


def is_initialized() -> bool:
    """Whether a default process group exists (``torch.distributed`` is set up)."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the default group); 0 without a group."""
    return int(_dist().get_rank(group)) if is_initialized() else 0


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (default: the default group); 1 without a group."""
    return int(_dist().get_world_size(group)) if is_initialized() else 1


def init_from_env(
    *, backend: str | None = None, timeout: timedelta | None = None
) -> Context | None:
    """Join the process group described by torchrun's environment variables.

    ``None`` when ``WORLD_SIZE`` is unset (not launched by torchrun: run as one process). If a
    default group already exists (your own ``init_process_group``), it is used as it is.

    Args:
        backend: default ``'cpu:gloo,cuda:nccl'`` where CUDA is available (NCCL for GPU tensors,
            gloo for CPU tensors and objects), else ``'gloo'``.
        timeout: of collectives and of the rendezvous; default ``torch.distributed``'s.
    """
    dist = _dist()
    env = os.environ
    local = int(env.get("LOCAL_RANK", "0"))
    if is_initialized():
        return Context(rank(), world_size(), local, str(dist.get_backend()), False)
    if "WORLD_SIZE" not in env:
        return None
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(
            f"init_from_env(): WORLD_SIZE is set but {', '.join(missing)} not; launch with "
            "torchrun (python -m torch.distributed.run), which sets RANK, LOCAL_RANK, WORLD_SIZE, "
            "MASTER_ADDR and MASTER_PORT, or unset WORLD_SIZE to run as one process."
        )
    if not dist.is_available():
        raise RuntimeError("init_from_env(): this torch build has no torch.distributed.")
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    store = _attempt_store(timeout)
    if store is None:
        dist.init_process_group(backend, init_method="env://", **kwargs)
    else:
        ranks = {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"])}
        dist.init_process_group(backend, store=store, **ranks, **kwargs)
    return Context(rank(), world_size(), local, backend, True)


def shutdown(context: Context | None, *, together: bool = True) -> None:
    """End the process group ``context`` owns; nothing when it is ``None`` or owns none.

    With ``together`` (the default) every rank first meets at a barrier, because a rank that
    tears gloo down while a peer is still in a collective or its own teardown can abort that
    peer ("terminate called without an active exception", exit code -6); pass
    ``together=False`` on an error path, where some peer may never arrive. The group's worker
    threads are collected here rather than in interpreter finalisation, where they can abort too.
    """
    if context is None or not context.owns_group or not is_initialized():
        return
    import gc

    dist = _dist()
    try:
        if together:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        gc.collect()


def _attempt_store(timeout: timedelta | None) -> Any:
    """On one node under torchrun, the agent's store with a prefix naming the restart attempt.

    torchrun's c10d rendezvous keeps one store for all restart attempts, and ``env://`` adds no
    prefix, so after a restart a rank can read the address a dead rank of the previous attempt
    published and fail to connect (pytorch/pytorch#135712, #167288; we saw it in 1 of 3
    restarts). With one agent every worker sees the same ``TORCHELASTIC_RESTART_COUNT``, so a
    prefix with it isolates the attempts; across nodes the agents' counts can differ, so there
    (``GROUP_WORLD_SIZE > 1``) this returns ``None``: launch with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which gives every attempt a fresh store.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1":
        return None
    dist = _dist()
    from torch.distributed.constants import default_pg_timeout

    agent = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
        timeout=timeout or default_pg_timeout,
    )  # fmt: skip
    return dist.PrefixStore(f"metafunc/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


# -- splitting a batch over ranks ------------------------------------------------------------


def split_sizes(n: int, world: int) -> list[int]:
    """How many of ``n`` items each of ``world`` ranks takes: ``n // world``, one more for the
    first ``n % world`` ranks. Every rank needs at least one item."""
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"split_sizes({n!r}, {world!r}): pass ints n >= world >= 1.")
    if n < world:
        raise ValueError(
            f"split_sizes({n}, {world}): {n} items cannot give each of {world} ranks one; use a "
            f"batch of at least {world} (the world size) or launch fewer processes."
        )
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def local_slice(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """The items of ``range(n)`` that rank ``rank_`` of ``world`` takes (default: this process in
    the default group): a contiguous block, sized by :func:`split_sizes`."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"local_slice({n}, rank={r}, world={w}): rank must lie in [0, {w}).")
    sizes = split_sizes(n, w)
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def split_batch(batch: Any, rank_: int | None = None, world: int | None = None) -> Any:
    """This rank's share of ``batch`` (a :class:`~metafunc.TaskBatch`, an ``(x, y)`` pair, any
    tree of tensors sharing a leading axis): every leaf sliced by :func:`local_slice`."""
    leaves = optree.tree_leaves(batch)
    sizes = {int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "split_batch(batch): every leaf must be a tensor with the same leading (task) axis; "
            f"got leading sizes {sorted(sizes)} (-1: not a tensor or 0-dimensional)."
        )
    part = local_slice(sizes.pop(), rank_, world)
    return optree.tree_map(lambda t: t[part], batch)


# -- collectives on trees -------------------------------------------------------------------


def _buckets(leaves: list[torch.Tensor], key: Any, bucket_bytes: int) -> list[list[int]]:
    """Leaf indices grouped by ``key(leaf)``, each group cut into runs of at most
    ``bucket_bytes`` (a leaf larger than that is a bucket of its own)."""
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(key(leaf), []).append(i)
    out: list[list[int]] = []
    for indices in groups.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = leaves[i].numel() * leaves[i].element_size()
            if current and size + nbytes > bucket_bytes:
                out.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        out.append(current)
    return out


def _tensor_leaves(call: str, tree: Any, *, floating: bool) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = optree.tree_flatten(tree)
    for path, leaf in zip(mt.paths(tree), leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{call}: leaf {path!r} is a {type(leaf).__name__}, not a tensor.")
        if floating and not leaf.is_floating_point():
            raise TypeError(
                f"{call}: leaf {path!r} is {leaf.dtype}; only floating tensors can be averaged. "
                "Leave integer counters out of the tree (every rank already agrees on them)."
            )
    return leaves, spec


def all_reduce_mean(
    tree: Any,
    weight: float | int | torch.Tensor = 1.0,
    *,
    group: Any = None,
    bucket_bytes: int = BUCKET_BYTES,
) -> Any:
    """The weighted mean over ranks of a tree of floating tensors, on every rank:
    ``sum_r weight_r * tree_r / sum_r weight_r``, leaf by leaf.

    Pass ``weight=`` the number of tasks this rank averaged over, so that ranks holding unequal
    shares of a meta-batch give exactly the mean over all its tasks. The leaves travel in a few
    flat buffers (one per device and dtype, at most ``bucket_bytes`` each, with the weight as
    their last element), so a tree of any size costs a few collectives; half-precision leaves are
    summed in float32. Returns new tensors; ``tree`` is not modified. Without a process group
    (or with one rank) it returns ``tree`` itself.

    Example::

        grads = all_reduce_mean(grads, weight=local_batch.num_tasks)
    """
    call = "all_reduce_mean(tree, weight)"
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{call}: weight={w!r}; pass this rank's number of tasks (>= 0).")
    leaves, spec = _tensor_leaves(call, tree, floating=True)
    if world_size(group) == 1 or not leaves:
        return tree
    dist = _dist()
    out: list[torch.Tensor] = list(leaves)

    def reduce_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float32)

    for bucket in _buckets(leaves, lambda t: (t.device, reduce_dtype(t)), bucket_bytes):
        first = leaves[bucket[0]]
        dtype = reduce_dtype(first)
        parts = [leaves[i].detach().reshape(-1).to(dtype) * w for i in bucket]
        weights = torch.full((1,), w, dtype=dtype, device=first.device)
        flat = torch.cat([*parts, weights])
        dist.all_reduce(flat, group=group)
        total = flat[-1]
        if float(total) <= 0:
            raise ValueError(f"{call}: every rank passed weight 0, so there is no mean.")
        mean = flat[:-1] / total
        for i, piece in zip(bucket, mean.split([leaves[i].numel() for i in bucket]), strict=True):
            out[i] = piece.reshape(leaves[i].shape).to(leaves[i].dtype)
    return optree.tree_unflatten(spec, out)


def broadcast_tree(
    tree: Any, src: int = 0, *, group: Any = None, bucket_bytes: int = BUCKET_BYTES
) -> Any:
    """Rank ``src``'s tree of tensors on every rank (every rank passes a tree of the same
    structure, shapes and dtypes, e.g. freshly initialised parameters). Bucketed like
    :func:`all_reduce_mean`; CPU tensors need a gloo backend (``init_from_env``'s default)."""
    leaves, spec = _tensor_leaves("broadcast_tree(tree)", tree, floating=False)
    if world_size(group) == 1 or not leaves:
        return tree
    dist = _dist()
    out: list[torch.Tensor] = list(leaves)
    for bucket in _buckets(leaves, lambda t: (t.device, t.dtype), bucket_bytes):
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in bucket])
        dist.broadcast(flat, src=src, group=group)
        for i, piece in zip(bucket, flat.split([leaves[i].numel() for i in bucket]), strict=True):
            out[i] = piece.reshape(leaves[i].shape).clone()
    return optree.tree_unflatten(spec, out)


def broadcast_object(obj: Any, src: int = 0, *, group: Any = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (small objects: configs, decisions)."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: Any, *, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, indexed by rank, on every rank."""
    if world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    _dist().all_gather_object(out, obj, group=group)
    return out


# -- agreement checks ------------------------------------------------------------------------


def tree_digest(tree: Any) -> str:
    """A SHA-256 of a tree's paths, shapes, dtypes and exact bytes (equal iff bit-identical)."""
    h = hashlib.sha256()
    for path, leaf in mt.flatten_with_paths(tree).items():
        t = leaf.detach().contiguous().reshape(-1)
        h.update(f"{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
        h.update(t.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _groups(values: list[str]) -> str:
    by_value: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        by_value.setdefault(v, []).append(r)
    parts = []
    for v, ranks in by_value.items():
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        parts.append(f"{who}: {v[:12]}")
    return "; ".join(parts)


def assert_in_sync(tree: Any, *, what: str = "tree", group: Any = None) -> None:
    """Raise ``RuntimeError`` unless ``tree`` is bit-identical on every rank (compares
    :func:`tree_digest` s; a debugging check, one small all-gather)."""
    digests = all_gather_object(tree_digest(tree), group=group)
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(
            f"{what} differ across ranks: rank(s) {', '.join(map(str, differ))} do not match "
            f"rank 0 (digests {_groups(digests)}). The ranks applied different updates: a "
            "collective that only some ranks ran, or a rank-dependent random choice."
        )


def assert_same(obj: Any, *, what: str = "the configuration", group: Any = None) -> None:
    """Raise ``ValueError`` unless the JSON-able ``obj`` (a config dict) hashes the same on every
    rank, naming the ranks that differ from rank 0 and, for dicts, the keys and values."""
    text = json.dumps(obj, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()
    gathered = all_gather_object((digest, obj), group=group)
    if all(d == gathered[0][0] for d, _ in gathered):
        return
    lines = []
    base = gathered[0][1]
    for r, (d, other) in enumerate(gathered):
        if d == gathered[0][0]:
            continue
        if isinstance(base, dict) and isinstance(other, dict):
            keys = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
            diff = ", ".join(f"{k}={other.get(k)!r} (rank 0: {base.get(k)!r})" for k in keys)
        else:
            diff = f"{other!r} (rank 0: {base!r})"
        lines.append(f"rank {r} has {diff}")
    raise ValueError(
        f"{what} differs across ranks: {'; '.join(lines)}. Launch every rank with the same "
        "flags and config file (on every node)."
    )
