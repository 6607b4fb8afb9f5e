"""What the entry-point checks cost: one meta-gradient with metafunc's input checks and per-task
random streams, against the same call with them switched off, in one process, alternating.

The checks (``Algorithm.check_inputs``: the meta-parameter tree and ``check_batch``; the
batch check in ``task_map`` and ``adapt``) and the per-task seeding of ``randomness`` are
switched off by replacing them with no-ops. Each round times every variant once, in turn,
each round starting one variant later; the median over rounds counts. Works: second-order MAML
on Omniglot-shaped 5-way 1-shot tasks (conv4, 15 queries per class, meta-batch 32, the CPU's
``'auto'``) and MAML on the sinusoid (meta-batch 25, K=10, ``'auto'``). Prints a table and
writes JSON.

Usage:
    python benchmarks/bench_checks.py --rounds 15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metafunc as mf
import metafunc.inner
import metafunc.strategies
from benchmarks.bench_sampler import machine
from metafunc.algorithms import MAML, Algorithm


def omniglot() -> tuple[Algorithm, Any, mf.TaskBatch]:
    gen = torch.Generator().manual_seed(0)
    tasks = 32
    batch = mf.TaskBatch(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen),
        torch.arange(5).repeat(tasks, 1),
        torch.rand(tasks, 75, 1, 28, 28, generator=gen),
        torch.arange(5).repeat_interleave(15).repeat(tasks, 1),
    )
    alg = MAML(mf.conv4(5, kernels="cpu"), inner_lr=0.4)  # as `metafunc train` on the CPU
    return alg, alg.init(gen), batch


def sinusoid() -> tuple[Algorithm, Any, mf.TaskBatch]:
    gen = torch.Generator().manual_seed(0)
    batch = mf.data.get_benchmark("sinusoid", shots=10).train.sample(25, gen)
    alg = MAML(mf.mlp(), inner_lr=0.01, loss="mse")
    return alg, alg.init(gen), batch


WORKS = {"omniglot-5w1s": omniglot, "sinusoid": sinusoid}


@contextlib.contextmanager
def switched_off(what: str) -> Iterator[None]:
    """``'none'``: as shipped; ``'checks'``: no input checks; ``'all'``: no checks and no
    per-task random streams."""
    saved = (
        Algorithm.check_inputs,
        metafunc.strategies.check_batch,
        metafunc.inner.check_batch,
        metafunc.strategies.task_seeds,
    )
    try:
        if what in ("checks", "all"):
            Algorithm.check_inputs = lambda self, call, meta, batch: None  # type: ignore[method-assign]
            metafunc.strategies.check_batch = lambda *a, **k: None  # type: ignore[assignment]
            metafunc.inner.check_batch = lambda *a, **k: None  # type: ignore[assignment]
        if what == "all":
            metafunc.strategies.task_seeds = lambda randomness, tasks: None  # type: ignore[assignment]
        yield
    finally:
        (
            Algorithm.check_inputs,  # type: ignore[method-assign]
            metafunc.strategies.check_batch,
            metafunc.inner.check_batch,
            metafunc.strategies.task_seeds,
        ) = saved


VARIANTS = ("none", "checks", "all")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--works", default=",".join(WORKS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results/bench_checks-cpu.json")
    args = parser.parse_args(argv)
    mf.tune_cpu_allocator()
    rows = []
    for name in args.works.split(","):
        alg, meta, batch = WORKS[name]()
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds + 1):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for variant in order:
                with switched_off(variant):
                    start = time.perf_counter()
                    alg.meta_grad(meta, batch)
                    if r:
                        times[variant].append(time.perf_counter() - start)
        ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
        row = {
            "work": name,
            "ms": {v: round(m, 3) for v, m in ms.items()},
            "checks_overhead": round(ms["none"] / ms["checks"] - 1, 4),
            "checks_and_streams_overhead": round(ms["none"] / ms["all"] - 1, 4),
        }
        rows.append(row)
        checks, both = 100 * row["checks_overhead"], 100 * row["checks_and_streams_overhead"]
        print(
            f"{name:14s} shipped {ms['none']:8.2f} ms  no checks {ms['checks']:8.2f} ms  "
            f"no checks, no streams {ms['all']:8.2f} ms  checks {checks:+.2f}%  "
            f"checks+streams {both:+.2f}%",
            flush=True,
        )
    result = {"machine": machine(torch.device("cpu")), "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
