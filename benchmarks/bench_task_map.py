"""``task_map(fn, strategy=...)`` on users' own per-task functions: what ``'auto'`` picks, and how
it compares with the fastest strategy, from tiny tasks (the sinusoid) to conv4 Omniglot tasks.

Each work is one meta-gradient of a per-task function written by hand with ``metafunc.adapt``
and ``metafunc.task_map`` (not an algorithm of the library): a learned-learning-rate MAML
(Meta-SGD's rule) on MLP regression tasks of several sizes, and second-order MAML on conv4
5-way 1-shot tasks. Every round times each strategy once, in turn, each round starting one
strategy later (a host whose speed drifts moves them all alike); the median counts. Prints a
table (ms per meta-gradient, and ``auto`` against the fastest) and writes JSON.

Usage:
    python benchmarks/bench_task_map.py                      # every work, 7 rounds
    python benchmarks/bench_task_map.py --works sinusoid --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metafunc as mf
from benchmarks.bench_sampler import machine
from metafunc.strategies import default_strategy, uses_convolutions

STRATEGIES = ("loop", "threads", "vmap", "auto")


def mlp_work(points: int, width_in: int, tasks: int) -> tuple[Callable[..., Any], Any, Any]:
    """Learned-rate MAML (two inner steps) on MLP regression tasks of ``points`` support and
    ``points`` query points of ``width_in`` inputs (the sinusoid: 10 points of 1 input)."""
    model = mf.mlp((width_in, 40, 40, 1))
    params = model.init(torch.Generator().manual_seed(0))
    meta = {"params": params, "lr": {k: torch.full_like(v, 0.01) for k, v in params.items()}}
    gen = torch.Generator().manual_seed(1)

    def draw(n: int) -> torch.Tensor:
        return torch.randn(tasks, n, width_in, generator=gen)

    sx, qx = draw(points), draw(points)
    batch = mf.TaskBatch(sx, sx.sum(-1, keepdim=True).sin(), qx, qx.sum(-1, keepdim=True).sin())

    def one(meta: Any, task: mf.TaskBatch) -> torch.Tensor:
        def loss(p: Any, t: mf.TaskBatch) -> torch.Tensor:
            return F.mse_loss(model.apply(p, t.support_x), t.support_y)

        adapted, _ = mf.adapt(loss, mf.optim.sgd(meta["lr"]), 2)(meta["params"], task)
        return F.mse_loss(model.apply(adapted, task.query_x), task.query_y)

    return one, meta, batch


def conv4_work(tasks: int) -> tuple[Callable[..., Any], Any, Any]:
    """Second-order MAML, one inner step at 0.4, on conv4 Omniglot-shaped 5-way 1-shot tasks
    with 15 queries per class."""
    model = mf.conv4(5, kernels="cpu")  # as `metafunc train` picks it on the CPU
    meta = {"params": model.init(torch.Generator().manual_seed(0))}
    gen = torch.Generator().manual_seed(1)
    sy = torch.arange(5).repeat(tasks, 1)
    qy = torch.arange(5).repeat_interleave(15).repeat(tasks, 1)
    batch = mf.TaskBatch(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen),
        sy,
        torch.rand(tasks, 75, 1, 28, 28, generator=gen),
        qy,
    )

    def one(meta: Any, task: mf.TaskBatch) -> torch.Tensor:
        def loss(p: Any, t: mf.TaskBatch) -> torch.Tensor:
            return F.cross_entropy(model.apply(p, t.support_x), t.support_y)

        adapted, _ = mf.adapt(loss, mf.optim.sgd(0.4), 1)(meta["params"], task)
        return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y)

    return one, meta, batch


WORKS: dict[str, Callable[[], tuple[Callable[..., Any], Any, Any]]] = {
    "sinusoid": lambda: mlp_work(10, 1, 25),
    "mlp-50x8": lambda: mlp_work(50, 8, 25),
    "mlp-50x32": lambda: mlp_work(50, 32, 25),
    "mlp-100x64": lambda: mlp_work(100, 64, 25),
    "conv4-5w1s": lambda: conv4_work(8),
}


def meta_grad(fn: Callable[..., Any], strategy: str, meta: Any, batch: Any) -> Any:
    leaves = [x.detach().requires_grad_() for x in mf.tree.leaves(meta)]
    tree = mf.tree.structure(meta).unflatten(leaves)
    loss = mf.task_map(fn, strategy=strategy)(tree, batch).mean()
    return torch.autograd.grad(loss, leaves)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--works", default=",".join(WORKS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/bench_task_map-cpu.json")
    args = parser.parse_args(argv)
    rows = []
    for name in args.works.split(","):
        fn, meta, batch = WORKS[name]()
        meta64, batch64 = mf.tree.cast(meta, torch.float64), batch.to(dtype=torch.float64)
        ref = meta_grad(fn, "loop", meta64, batch64)
        for s in STRATEGIES[1:]:  # the same gradient first, in float64
            diff = mf.tree.global_norm(mf.tree.sub(meta_grad(fn, s, meta64, batch64), ref))
            err = float(diff / mf.tree.global_norm(ref))
            if err > 1e-10:
                raise AssertionError(f"{name}: {s} differs from the loop by {err:.2g}")
        times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for r in range(args.rounds + 1):
            order = STRATEGIES[r % len(STRATEGIES) :] + STRATEGIES[: r % len(STRATEGIES)]
            for s in order:
                start = time.perf_counter()
                meta_grad(fn, s, meta, batch)
                if r:
                    times[s].append(time.perf_counter() - start)
        ms = {s: 1e3 * statistics.median(v) for s, v in times.items()}
        fastest = min(ms[s] for s in STRATEGIES[:-1])
        task = mf.TaskBatch(*(f[0] for f in batch))
        picks = default_strategy("cpu", convolutional=uses_convolutions(fn, meta, task))
        row = {
            "work": name,
            "tasks": batch.num_tasks,
            "auto_picks": picks,
            "ms": {s: round(v, 3) for s, v in ms.items()},
            "auto_over_fastest": round(ms["auto"] / fastest, 3),
        }
        rows.append(row)
        print(
            f"{name:12s} "
            + "  ".join(f"{s} {ms[s]:8.2f}" for s in STRATEGIES)
            + f"  auto->{row['auto_picks']}, {row['auto_over_fastest']:.2f}x the fastest",
            flush=True,
        )
    result = {"machine": machine(torch.device("cpu")), "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
