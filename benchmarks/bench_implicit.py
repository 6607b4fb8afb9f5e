"""Implicit against unrolled hypergradients as the inner loop grows: time and peak memory.

The problem is the worked example's (``examples/bilevel_digits.py``) with a larger inner model:
per-example weights of scikit-learn's digits training set (600 examples), an MLP 64-256-256-10
trained on the weighted loss by SGD, the clean validation loss outside. For each number of inner
steps, ``metafunc.implicit.hypergradient`` runs once per method, each in a process of its own
(float64, one thread), and reports the wall time and the peak resident memory above the
process's state before the call. Unrolled differentiation keeps every step's activations;
the implicit gradient keeps none of them. Prints a table and writes JSON.

    python benchmarks/bench_implicit.py --steps 10,25,50,100,200
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sampler import machine  # noqa: E402
from metafunc import optim  # noqa: E402
from metafunc.implicit import hypergradient  # noqa: E402


def problem() -> tuple[Any, Any, Any, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:600], order[600:1000]
    noisy = y[train].clone()
    corrupt = torch.rand(len(train), generator=torch.Generator().manual_seed(1)) < 1 / 3
    noisy[corrupt] = torch.randint(0, 10, (int(corrupt.sum()),), generator=torch.Generator())

    def net(p: Any, inputs: torch.Tensor) -> torch.Tensor:
        h = torch.relu(inputs @ p["w0"] + p["b0"])
        h = torch.relu(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    def inner(p: Any, h: Any) -> torch.Tensor:
        weights = torch.sigmoid(h["logit"])
        losses = F.cross_entropy(net(p, x[train]), noisy, reduction="none")
        decay = sum((p[k] ** 2).sum() for k in ("w0", "w1", "w2"))
        return (weights * losses).sum() / weights.sum() + 1e-3 * decay

    def outer(p: Any, h: Any) -> torch.Tensor:
        return F.cross_entropy(net(p, x[val]), y[val])

    gen = torch.Generator().manual_seed(2)

    def layer(n_in: int, n_out: int) -> torch.Tensor:
        return torch.randn(n_in, n_out, generator=gen, dtype=torch.float64) / n_in**0.5

    params = {
        "w0": layer(64, 256), "b0": torch.zeros(256, dtype=torch.float64),
        "w1": layer(256, 256), "b1": torch.zeros(256, dtype=torch.float64),
        "w2": layer(256, 10), "b2": torch.zeros(10, dtype=torch.float64),
    }  # fmt: skip
    hyper = {"logit": torch.zeros(len(train), dtype=torch.float64)}
    return inner, outer, hyper, params


def worker(method: str, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    inner, outer, hyper, params = problem()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    grads, info = hypergradient(
        inner, outer, hyper, params, method=method, steps=steps, optimizer=optim.sgd(0.5),
        tol=1e-8, maxiter=200,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "method": method,
        "steps": steps,
        "seconds": round(seconds, 3),
        "peak_mib": round(peak / 1024, 1),
        "grad_norm": float(grads["logit"].norm()),
        "inner_grad_norm": float(info.inner_grad_norm),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,25,50,100,200")
    parser.add_argument("--methods", default="implicit,unrolled")
    parser.add_argument("--out", default="benchmarks/results/bench_implicit-cpu.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return {}
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--worker", method, str(steps)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{steps:4d} steps  {method:9s} {row['seconds']:8.2f} s  {row['peak_mib']:8.1f} "
                  f"MiB  |hypergradient| {row['grad_norm']:.4g}", flush=True)  # fmt: skip
    result = {"machine": machine(torch.device("cpu")), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
