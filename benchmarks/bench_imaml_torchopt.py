"""iMAML's meta-gradient in metafunc against TorchOpt's implicit-gradient iMAML, identical work,
each in its own process (TorchOpt in ``.peers-venv``: ``bash benchmarks/peers/install.sh``).

The work is TorchOpt's own iMAML example (``examples/iMAML/imaml_omniglot_functional.py``): its
network (three 3x3 convolutions with batch norm, ReLU and max-pooling, a linear head), 16 tasks
of 5-way 5-shot with 5 queries per class, 5 inner SGD steps at 0.1 on the proximally regularised
support loss (λ = 2), and the implicit meta-gradient by 5 iterations of CG on the normal
equations, tasks in a loop, one backward per meta-batch. metafunc runs the same through
``metafunc.implicit.custom_root`` with ``linalg.normal_cg`` (``metafunc-normal-cg``) and through
its ``IMAML`` algorithm (``metafunc-imaml``: CG on the symmetric system, its default strategy).
First every implementation computes the float64 meta-gradient from the same parameters and the
first ``CHECK_TASKS`` tasks with the linear solves run to convergence (they must agree within
1e-8), then each times float32 meta-gradients of all 16 tasks (median of ``--rounds``). Prints a
table and writes JSON.

    python benchmarks/bench_imaml_torchopt.py --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS, WAYS, SHOTS, QUERIES, STEPS, LR, LAM = 16, 5, 5, 5, 5, 0.1, 2.0
CHECK_TASKS, CHECK_SOLVER_STEPS = 2, 200  # the float64 check: converged solves are slow


def network() -> nn.Module:
    """TorchOpt's example network (batch statistics always, no running statistics)."""

    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, 64, 3), nn.BatchNorm2d(64, track_running_stats=False),
                nn.ReLU(), nn.MaxPool2d(2, 2)]  # fmt: skip

    return nn.Sequential(*block(1), *block(64), *block(64), nn.Flatten(), nn.Linear(64, WAYS))


def inputs(path: Path) -> None:
    """Initial parameters and a meta-batch of random 28x28 tasks, in float64."""
    torch.manual_seed(0)
    params = {k: v.detach().double() for k, v in network().named_parameters()}
    gen = torch.Generator().manual_seed(1)
    data = {
        "sx": torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=gen, dtype=torch.float64),
        "sy": torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1),
        "qx": torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=gen, dtype=torch.float64),
        "qy": torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1),
    }
    torch.save({"params": params, "data": data}, path)


def torchopt_grad(params: dict[str, torch.Tensor], data: Any, maxiter: int) -> Any:
    """TorchOpt's example, as it writes it (functional net, per-task loop, custom_root)."""
    import torchopt
    from torch.func import functional_call

    net = network().to(next(iter(params.values())).dtype)
    names = list(params)

    def fnet(p: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, dict(zip(names, p, strict=True)), (x,))

    def objective(p: Any, meta: Any, task: Any) -> torch.Tensor:
        x, y = task
        reg = sum(0.5 * LAM * torch.sum((a - b) ** 2) for a, b in zip(p, meta, strict=True))
        return F.cross_entropy(fnet(p, x), y) + reg

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0), argnums=1,
        solve=torchopt.linear_solve.solve_normal_cg(maxiter=maxiter, rtol=0.0, atol=0.0),
    )  # fmt: skip
    def solver(p: Any, meta: Any, task: Any) -> Any:
        opt = torchopt.sgd(lr=LR)
        state = opt.init(p)
        with torch.enable_grad():
            for _ in range(STEPS):
                grads = torch.autograd.grad(objective(p, meta, task), p)
                updates, state = opt.update(grads, state, inplace=True)
                p = torchopt.apply_updates(p, updates, inplace=True)
        return p

    meta = tuple(params[n].detach().clone().requires_grad_() for n in names)
    losses = []
    for t in range(data["sx"].shape[0]):
        init = tuple(m.detach().clone().requires_grad_() for m in meta)
        adapted = solver(init, meta, (data["sx"][t], data["sy"][t]))
        losses.append(F.cross_entropy(fnet(adapted, data["qx"][t]), data["qy"][t]))
    grads = torch.autograd.grad(torch.stack(losses).mean(), meta)
    return dict(zip(names, grads, strict=True))


def metafunc_grad(params: dict[str, torch.Tensor], data: Any, maxiter: int, kind: str) -> Any:
    import metafunc as mf
    from metafunc import linalg
    from metafunc.algorithms import IMAML
    from metafunc.implicit import custom_root

    model = mf.from_module(network())
    batch = mf.TaskBatch(data["sx"], data["sy"], data["qx"], data["qy"])
    if kind == "imaml":
        alg = IMAML(model, lam=LAM, inner_lr=LR, inner_steps=STEPS, cg_steps=maxiter,
                    cg_tol=0.0)  # fmt: skip
        return alg.meta_grad({"params": params}, batch)[0]["params"]

    def support(p: Any, task: mf.TaskBatch) -> torch.Tensor:
        return F.cross_entropy(model.apply(p, task.support_x), task.support_y)

    def objective(p: Any, meta: Any, task: mf.TaskBatch) -> torch.Tensor:
        d = mf.tree.sub(p, meta)
        return support(p, task) + 0.5 * LAM * mf.tree.vdot(d, d)

    def task_loss(meta: Any, task: mf.TaskBatch) -> torch.Tensor:
        inner = mf.adapt(lambda p, t: objective(p, meta, t), mf.optim.sgd(LR), STEPS,
                         first_order=True)  # fmt: skip

        @custom_root(lambda p, m: torch.func.grad(objective)(p, m, task), linalg.normal_cg,
                     maxiter=maxiter, tol=0.0)  # fmt: skip
        def solve(init: Any, m: Any) -> Any:
            return mf.tree.detach(inner(mf.tree.detach(m), task)[0])

        adapted = solve(None, meta)
        return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y)

    meta = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss = mf.task_map(task_loss, strategy="loop")(meta, batch).mean()
    return dict(zip(meta, torch.autograd.grad(loss, list(meta.values())), strict=True))


def worker(impl: str, path: Path, out: Path, rounds: int) -> None:
    torch.set_num_threads(1)
    saved = torch.load(path, weights_only=True)

    def run(params: Any, data: Any, maxiter: int) -> Any:
        if impl == "torchopt":
            return torchopt_grad(params, data, maxiter)
        return metafunc_grad(params, data, maxiter, impl.split("-", 1)[1])

    few = {k: v[:CHECK_TASKS] for k, v in saved["data"].items()}
    check = run(saved["params"], few, CHECK_SOLVER_STEPS)  # float64, converged solves
    torch.save({k: v.detach() for k, v in check.items()}, out.with_suffix(".grad.pt"))
    params = {k: v.float() for k, v in saved["params"].items()}
    data = {k: v.float() if v.is_floating_point() else v for k, v in saved["data"].items()}
    run(params, data, 5)  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(params, data, 5)
        times.append(time.perf_counter() - start)
    out.write_text(json.dumps({"impl": impl, "seconds": statistics.median(times)}))


IMPLS = ("torchopt", "metafunc-normal-cg", "metafunc-imaml")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--peers-python", default=str(ROOT / ".peers-venv" / "bin" / "python"))
    parser.add_argument("--out", default="benchmarks/results/bench_imaml_torchopt-cpu.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]), args.rounds)
        return {}
    from benchmarks.bench_sampler import machine

    rows, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.pt"
        inputs(path)
        for impl in IMPLS:
            python = args.peers_python if impl == "torchopt" else sys.executable
            out = Path(tmp) / f"{impl}.json"
            cmd = [python, __file__, "--rounds", str(args.rounds), "--worker", impl, str(path),
                   str(out)]  # fmt: skip
            subprocess.run(cmd, check=True, cwd=ROOT)
            rows[impl] = json.loads(out.read_text())["seconds"]
            grads[impl] = torch.load(out.with_suffix(".grad.pt"), weights_only=True)
    ref = grads["torchopt"]
    errors = {}
    for impl in IMPLS[1:]:
        diff = sum(float(((grads[impl][k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
        errors[impl] = diff / sum(float((v**2).sum()) for v in ref.values()) ** 0.5
        if errors[impl] > 1e-8:
            raise AssertionError(f"{impl} differs from TorchOpt's gradient by {errors[impl]:.2g}")
    for impl in IMPLS:
        speed = rows["torchopt"] / rows[impl]
        err = f"grad rel. error {errors[impl]:.1e}" if impl in errors else "reference"
        print(f"{impl:20s} {1e3 * rows[impl]:9.1f} ms  {speed:5.2f}x TorchOpt's speed  {err}")
    result = {"machine": machine(torch.device("cpu")), "seconds": rows, "grad_rel_error": errors}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
