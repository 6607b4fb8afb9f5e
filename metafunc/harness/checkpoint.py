"""Checkpoints: the whole training state in one safetensors file, written atomically.

A checkpoint holds tensors only (safetensors: a JSON header and raw bytes, never pickle), so
loading one cannot run code. Trees are stored flat under their dotted paths with a prefix
(``meta/``, ``opt/``, ``rng/``); the structure is rebuilt from a template made the same way
(``algorithm.init`` and ``optimizer.init``), so a checkpoint that does not match the run fails
with the missing or extra paths named.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import optree
import torch

from metafunc import tree as mt

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "metafunc-checkpoint-1"
_NAME = re.compile(r"ckpt-(\d{8})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the run."""


def _flat(prefix: str, tree: Any) -> dict[str, torch.Tensor]:
    out = {}
    for path, leaf in mt.flatten_with_paths(tree).items():
        out[f"{prefix}/{path}"] = leaf.detach().contiguous().cpu()
    return out


def save_checkpoint(
    directory: str | Path,
    step: int,
    trees: dict[str, Any],
    metadata: dict[str, Any],
    *,
    keep: int = 3,
    name: str | None = None,
) -> Path:
    """Write ``ckpt-<step>.safetensors`` atomically (temporary file, fsync, rename), then delete
    all but the newest ``keep`` checkpoints. ``trees`` maps a prefix to a tree of tensors.
    ``name``: write ``directory/name`` instead and delete nothing (e.g. the best checkpoint)."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, tree in trees.items():
        tensors.update(_flat(prefix, tree))
    header = {"format": FORMAT, "step": str(step), "metadata": json.dumps(metadata)}
    data = save(tensors, metadata=header)
    final = directory / (name or f"ckpt-{step:08d}.safetensors")
    for stale in directory.glob(".ckpt-*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if name is None:
        for old in sorted(directory.glob("ckpt-*.safetensors"))[:-keep]:
            old.unlink(missing_ok=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``ckpt-*.safetensors`` in ``directory``, or ``None``."""
    found = sorted(p for p in Path(directory).glob("ckpt-*.safetensors") if _NAME.search(p.name))
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, templates: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into trees shaped like ``templates`` (prefix -> template tree).

    Returns ``(step, trees, metadata)``. Raises :class:`CheckpointError` for a file that is not
    a safetensors checkpoint (a pickle, a truncated file) or whose tensors do not match.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"load_checkpoint({path}): not a readable metafunc checkpoint ({err}). It may be "
            "truncated or not a safetensors file; metafunc never unpickles checkpoints. Delete it "
            "to resume from the previous one."
        ) from err
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"load_checkpoint({path}): header format is {header.get('format')!r}, expected "
            f"{FORMAT!r}; this file was not written by metafunc."
        )
    out: dict[str, Any] = {}
    for prefix, template in templates.items():
        flat_t = mt.flatten_with_paths(template)
        leaves = []
        for p, like in flat_t.items():
            key = f"{prefix}/{p}"
            if key not in tensors:
                raise CheckpointError(
                    f"load_checkpoint({path}): no tensor {key!r}; the checkpoint belongs to a "
                    "different configuration."
                )
            t = tensors[key]
            if t.shape != like.shape:
                raise CheckpointError(
                    f"load_checkpoint({path}): {key!r} has shape {tuple(t.shape)}, expected "
                    f"{tuple(like.shape)}."
                )
            leaves.append(t.to(dtype=like.dtype, device=like.device))
        out[prefix] = optree.tree_unflatten(optree.tree_structure(template), leaves)
    return int(header["step"]), out, json.loads(header.get("metadata", "{}"))
