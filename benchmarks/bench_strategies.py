"""metafunc's task-parallel variants against a plain per-task loop, in one process, in turn.

Each round times one second-order meta-gradient of every variant, starting one variant later
than the round before, on the same Omniglot-shaped random tasks (conv4, stride pooling), so
that a host whose speed drifts (a shared VM) moves every variant alike. Prints the median per
variant and the median over rounds of ``first / variant`` (the first of ``--variants``,
``plain`` by default), and writes JSON. ``--algorithm`` times first-order MAML, Reptile or ANIL
instead of MAML (their variants only; ``plain`` is second-order MAML's reference).

Variants: ``plain`` (``torch.autograd.grad(create_graph=True)`` per task on the peer
benchmark's functional conv4, as ``metafunc bench peers``' reference), ``auto`` (metafunc's
default), ``loop`` and ``threads`` (with ``MAML``'s default ``shared_first_step``),
``loop-unshared``, ``loop-shared`` and ``threads-shared`` (``shared_first_step`` forced off or
on) and ``auto-reference`` (``conv4(kernels='reference')``: the plain layers); every other
variant opts in to ``conv4(kernels='cpu')`` (:mod:`metafunc.kernels`), as ``metafunc train``
does on the CPU.

Usage:
    python benchmarks/bench_strategies.py                        # 5-way 1-shot, mb 32, 1 step
    python benchmarks/bench_strategies.py --ways 20 --meta-batch 16 --steps 5 --rounds 4
    python benchmarks/bench_strategies.py --algorithm reptile --variants auto,auto-reference
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

from benchmarks.bench_sampler import machine
from benchmarks.peers.model import conv4_apply
from metafunc import TaskBatch, tune_cpu_allocator
from metafunc.algorithms import ANIL, MAML, FirstOrderMAML, Reptile
from metafunc.models import conv4

VARIANTS: dict[str, tuple[str, bool | None, str]] = {
    # name: (strategy, shared_first_step, conv4's kernels)
    "auto": ("auto", None, "cpu"),
    "auto-reference": ("auto", None, "reference"),
    "loop": ("loop", None, "cpu"),
    "loop-unshared": ("loop", False, "cpu"),
    "loop-shared": ("loop", True, "cpu"),
    "threads": ("threads", None, "cpu"),
    "threads-shared": ("threads", True, "cpu"),
}

ALGORITHMS: dict[str, Callable[..., Any]] = {
    "maml": MAML,
    "fomaml": FirstOrderMAML,
    "reptile": Reptile,
    "anil": ANIL,
}


def tasks(args: argparse.Namespace) -> TaskBatch:
    g = torch.Generator().manual_seed(args.seed)
    t, w = args.meta_batch, args.ways

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(t, w * n, 1, 28, 28, generator=g)
        return x, torch.arange(w).repeat_interleave(n).expand(t, -1).contiguous()

    return TaskBatch(*split(args.shots), *split(args.queries))


def plain(params: dict[str, torch.Tensor], batch: TaskBatch, steps: int, lr: float) -> Any:
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    losses = []
    for t in range(batch.num_tasks):
        fast = leaves
        for _ in range(steps):
            logits = conv4_apply(fast, batch.support_x[t], pooling="stride")
            loss = F.cross_entropy(logits, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: p - lr * g for (k, p), g in zip(fast.items(), grads, strict=True)}
        logits = conv4_apply(fast, batch.query_x[t], pooling="stride")
        losses.append(F.cross_entropy(logits, batch.query_y[t]))
    return torch.autograd.grad(torch.stack(losses).mean(), list(leaves.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="maml")
    p.add_argument("--variants", default=None, help="default: plain (MAML only) and all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/bench_strategies.json"))
    args = p.parse_args(argv)
    maml = args.algorithm == "maml"
    default = ["plain", *VARIANTS] if maml else list(VARIANTS)
    names = [n for n in args.variants.split(",") if n] if args.variants else default
    unknown = [n for n in names if n not in VARIANTS and not (maml and n == "plain")]
    if unknown or not names:
        known = sorted(VARIANTS) + (["plain"] if maml else [])
        p.error(f"--variants: names from {known} ({args.algorithm}); got {unknown or names}")
    tuned = tune_cpu_allocator()  # as metafunc train does
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    batch = tasks(args)
    meta = {
        "params": conv4(args.ways, hidden=args.hidden).init(
            torch.Generator().manual_seed(args.seed)
        )
    }
    calls: dict[str, Callable[[], Any]] = {
        "plain": lambda: plain(meta["params"], batch, args.steps, args.lr)
    }
    for name in names:
        if name != "plain":
            strategy, shared, kernels = VARIANTS[name]
            model = conv4(args.ways, hidden=args.hidden, kernels=kernels)
            alg = ALGORITHMS[args.algorithm](
                model, inner_lr=args.lr, inner_steps=args.steps, strategy=strategy,
                **({} if args.algorithm == "reptile" else {"shared_first_step": shared}),
            )  # fmt: skip
            calls[name] = lambda alg=alg: alg.meta_grad(meta, batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:  # warm-up
        calls[name]()
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name in names:
        ratios = [a / b for a, b in zip(times[names[0]], times[name], strict=True)]
        rows.append(
            {
                "variant": name,
                "median_s": statistics.median(times[name]),
                "first_over_this": statistics.median(ratios),
                "times_s": times[name],
            }
        )
    print(f"{args.algorithm}: {'variant':16s} {'median s':>9s} {names[0] + ' / this':>16s}")
    for row in rows:
        print(f"{row['variant']:16s} {row['median_s']:9.3f} {row['first_over_this']:16.2f}")
    result = {
        "machine": machine(torch.device("cpu")),
        "allocator_tuned": tuned,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
