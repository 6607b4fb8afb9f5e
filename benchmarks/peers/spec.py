"""The benchmark spec: what one peer run computes, read from and written to JSON.

A spec fixes the task shape, the inner loop, the model and the timing loop. ``SETTINGS`` holds the
named settings of the benchmark (MAML paper hyper-parameters); ``tiny`` shrinks one for the float64
correctness check.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SETTINGS", "Spec", "load_spec", "setting", "tiny"]

_POOLINGS = ("stride", "maxpool")
_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Spec:
    """One benchmark run. Field meanings (all required in the JSON unless a default is shown):

    Attributes:
        name: setting name, e.g. ``"omniglot-5w1s"``; only echoed in the result.
        ways, shots, queries: classes per task, support and query examples per class.
        meta_batch: tasks per meta-iteration (``T``).
        inner_steps, inner_lr: plain SGD steps on the support cross-entropy, and their rate.
        first_order: drop the second-order terms (FOMAML) when True.
        image_size: 28 (Omniglot) or 84 (mini-ImageNet); channels: 1 or 3; hidden: conv width.
        pooling: ``"stride"`` (stride-2 3x3 convs, global average pool) or ``"maxpool"``
            (stride-1 convs, 2x2 max-pool after each block, flatten).
        dtype: ``"float32"`` or ``"float64"``; device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        warmup, iters: untimed and timed meta-iterations.
        max_seconds: stop timing early once the timed iterations add up to this many seconds
            (after at least 3 of them), so a slow impl cannot eat a fixed budget such as a lent
            GPU's; None times all ``iters``. The result says how many were timed.
        outer_lr: learning rate of the outer ``torch.optim.Adam``.
        init_path, data_path: the init and data files (``make_inputs`` writes them); relative
            paths are relative to the spec file.
        threads: ``torch.set_num_threads`` value, or None for torch's default.
        per_task_backward: None (the default) runs each task-loop impl in the backward style of
            its library's official MAML example (``PER_TASK_BACKWARD`` in its module: per task
            for plain, learn2learn and higher, once on the mean for the two TorchOpt impls).
            True calls ``backward`` on each task's query loss divided by ``T`` as soon as it is
            computed (lower memory: one task's graph at a time); False once on the mean (the
            whole meta-batch's graph held). Same gradient; ignored by impls without a task loop
            (funcvmap, metafunc*); the result's ``backward`` says which style ran.
    """

    name: str
    ways: int
    shots: int
    queries: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    first_order: bool
    image_size: int
    channels: int
    hidden: int
    pooling: str
    dtype: str
    device: str
    warmup: int
    iters: int
    outer_lr: float
    init_path: str = "init.pt"
    data_path: str = "data.pt"
    threads: int | None = None
    per_task_backward: bool | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        where = f"Spec(name={self.name!r})"
        for field in ("ways", "shots", "queries", "meta_batch", "image_size", "channels", "hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {field}={value!r}; it must be a positive int.")
        for field in ("inner_steps", "warmup", "iters"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: {field}={value!r}; it must be an int >= 0.")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(
                f"{where}: max_seconds={self.max_seconds!r}; use a positive number or None."
            )
        if self.warmup + self.iters < 1:
            raise ValueError(f"{where}: warmup + iters is 0; run at least one iteration.")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"{where}: pooling={self.pooling!r}; use one of {_POOLINGS}.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"{where}: dtype={self.dtype!r}; use one of {_DTYPES}.")
        if self.pooling == "maxpool" and self.image_size < 16:
            raise ValueError(
                f"{where}: image_size={self.image_size} is too small for four 2x2 max-pools; "
                "use image_size >= 16 or pooling='stride'."
            )
        if self.per_task_backward is not None and not isinstance(self.per_task_backward, bool):
            raise TypeError(
                f"{where}: per_task_backward={self.per_task_backward!r}; use True, False or None "
                "(each impl's official style)."
            )
        if not isinstance(self.first_order, bool):
            raise TypeError(f"{where}: first_order={self.first_order!r}; it must be a bool.")

    @property
    def support_size(self) -> int:
        """Support examples per task (``ways * shots``)."""
        return self.ways * self.shots

    @property
    def query_size(self) -> int:
        """Query examples per task (``ways * queries``)."""
        return self.ways * self.queries

    def replace(self, **changes: Any) -> Spec:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the spec as JSON to ``path`` and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        """Build a spec from a dict, naming unknown or missing fields in the error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Spec.from_json: unknown fields {unknown}; known: {sorted(known)}.")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"Spec.from_json: missing fields {missing}.")
        return cls(**data)


def load_spec(path: str | Path) -> Spec:
    """Read a spec JSON; ``init_path``/``data_path`` are resolved against the spec's folder."""
    path = Path(path)
    spec = Spec.from_json(json.loads(path.read_text()))
    base = path.resolve().parent
    return spec.replace(init_path=str(base / spec.init_path), data_path=str(base / spec.data_path))


_OMNIGLOT = {"image_size": 28, "channels": 1, "hidden": 64, "pooling": "stride", "queries": 15}
_MINI = {"image_size": 84, "channels": 3, "hidden": 32, "pooling": "maxpool", "queries": 15}
_RUN = {"first_order": False, "dtype": "float32", "device": "cpu", "warmup": 1, "iters": 3}
_RUN = {**_RUN, "outer_lr": 1e-3}

#: The benchmark's settings: MAML (Finn et al., 2017) hyper-parameters, 15 queries per class
#: unless named otherwise.
SETTINGS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": {**_OMNIGLOT, "ways": 5, "shots": 1, "meta_batch": 32, "inner_steps": 1,
                      "inner_lr": 0.4},
    "omniglot-5w5s": {**_OMNIGLOT, "ways": 5, "shots": 5, "meta_batch": 32, "inner_steps": 1,
                      "inner_lr": 0.4},
    "omniglot-20w1s": {**_OMNIGLOT, "ways": 20, "shots": 1, "meta_batch": 16, "inner_steps": 5,
                       "inner_lr": 0.1},
    "omniglot-20w5s": {**_OMNIGLOT, "ways": 20, "shots": 5, "meta_batch": 16, "inner_steps": 5,
                       "inner_lr": 0.1},
    # the 20-way setting as issue 6 words it: 5 queries per class (100 query images, not 300),
    # so the five second-order support steps weigh more against the query pass
    "omniglot-20w1s-5q": {**_OMNIGLOT, "ways": 20, "shots": 1, "queries": 5, "meta_batch": 16,
                          "inner_steps": 5, "inner_lr": 0.1},
    # the Omniglot settings on the max-pool conv4 (stride-1 convs, 2x2 max-pool per block, as
    # on mini-ImageNet): about 4x the stride conv4's conv outputs, so the graphs a backward
    # style holds weigh more
    "omniglot-5w1s-maxpool": {**_OMNIGLOT, "pooling": "maxpool", "ways": 5, "shots": 1,
                              "meta_batch": 32, "inner_steps": 1, "inner_lr": 0.4},
    "omniglot-20w1s-maxpool": {**_OMNIGLOT, "pooling": "maxpool", "ways": 20, "shots": 1,
                               "meta_batch": 16, "inner_steps": 5, "inner_lr": 0.1},
    "mini-5w1s": {**_MINI, "ways": 5, "shots": 1, "meta_batch": 4, "inner_steps": 5,
                  "inner_lr": 0.01},
    "mini-5w5s": {**_MINI, "ways": 5, "shots": 5, "meta_batch": 2, "inner_steps": 5,
                  "inner_lr": 0.01},
}  # fmt: skip


def setting(setting_name: str, /, **overrides: Any) -> Spec:
    """The named setting from ``SETTINGS`` as a float32 CPU spec, with ``overrides`` applied.

    Example: ``setting("omniglot-5w1s", device="cuda", iters=50)``; ``name=`` renames the spec.
    """
    if setting_name not in SETTINGS:
        raise ValueError(f"setting({setting_name!r}): unknown setting; known: {sorted(SETTINGS)}.")
    return Spec(**{"name": setting_name, **_RUN, **SETTINGS[setting_name], **overrides})


def tiny(spec: Spec) -> Spec:
    """A float64 miniature of ``spec`` for the correctness check.

    Keeps ways, shots, image size, channels, pooling and first_order (they change the code path);
    shrinks the meta-batch to 2 tasks, the query set to 2 per class, the width to 8 and the inner
    loop to at most 2 steps, and runs 2 untimed-in-spirit iterations (warmup 0, iters 2).
    """
    return spec.replace(
        name=f"{spec.name}-tiny",
        meta_batch=2,
        queries=2,
        hidden=8,
        inner_steps=min(spec.inner_steps, 2),
        dtype="float64",
        warmup=0,
        iters=2,
    )
