"""metafunc's training step against the same step in JAX (``jax.jit`` of the whole step,
``jax.vmap`` over tasks, optax's Adam), each in its own process, in one run.

Every setting first checks that both compute the same float64 meta-gradient from the same
parameters and tasks (within 1e-10 relative), then times the whole float32 step, tasks drawn
inside it: metafunc's eager step, its compiled one (:func:`metafunc.compile_step`, with
``sample_keyed``) and the compiled one saved and loaded back (``compile_step(cache=...)``,
what a repeated ``metafunc train`` runs) against JAX's jitted one. One thread per process
(``--threads``). JAX and optax live in ``.jax-venv`` (``bash benchmarks/jax/install.sh``).
Prints a table and writes JSON; figures and their machine in ``benchmarks/HISTORY.md`` ("JAX").

Settings: MAML on the sinusoid as in the paper (1-40-40-1 ReLU MLP, meta-batch 25, K=10 support
and 10 query points, one inner SGD step at 0.01, second order, Adam 1e-3); the same with 5 inner
steps; with meta-batch 100; Meta-SGD on the sinusoid; conv4 Omniglot-shaped 5-way 1-shot (15
queries, meta-batch 32, one step at 0.4) and 20-way 1-shot (5 queries, meta-batch 16, 5 steps
at 0.1) on a bank of random 28x28 images.

On a GPU machine without JAX (``benchmarks/gpu.sh``), ``--no-jax --device cuda --modes
eager,default,reduce-overhead`` times metafunc's step alone: eager, compiled, and compiled with
CUDA graphs (``reduce-overhead``).

Usage:
    python benchmarks/bench_jax.py                        # every setting
    python benchmarks/bench_jax.py --settings sinusoid,sinusoid-5steps --rounds 7
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metafunc as mf  # noqa: E402
from benchmarks.bench_sampler import machine  # noqa: E402
from metafunc.algorithms import MAML, MetaSGD  # noqa: E402

SINE = {"model": "mlp", "algorithm": "maml", "tasks": 25, "shots": 10, "queries": 10,
        "inner_steps": 1, "inner_lr": 0.01}  # fmt: skip
SETTINGS: dict[str, dict[str, Any]] = {
    "sinusoid": SINE,
    "sinusoid-5steps": {**SINE, "inner_steps": 5},
    "sinusoid-mb100": {**SINE, "tasks": 100},
    "metasgd-sinusoid": {**SINE, "algorithm": "metasgd"},
    "omniglot-5w1s": {
        "model": "conv4",
        "algorithm": "maml",
        "tasks": 32,
        "ways": 5,
        "shots": 1,
        "queries": 15,
        "inner_steps": 1,
        "inner_lr": 0.4,
    },
    "omniglot-20w1s": {
        "model": "conv4",
        "algorithm": "maml",
        "tasks": 16,
        "ways": 20,
        "shots": 1,
        "queries": 5,
        "inner_steps": 5,
        "inner_lr": 0.1,
    },
}
BANK_CLASSES = 964  # Omniglot's background classes, 20 drawings each


def build(spec: dict[str, Any]) -> tuple[Any, Any]:
    """The metafunc algorithm of a setting, and its task sampler for the step."""
    # metafunc's CPU kernels, as `metafunc train` picks them on the CPU
    model = mf.mlp() if spec["model"] == "mlp" else mf.conv4(spec["ways"], kernels="cpu")
    kind = MetaSGD if spec["algorithm"] == "metasgd" else MAML
    loss = "mse" if spec["model"] == "mlp" else "cross_entropy"
    alg = kind(model, inner_lr=spec["inner_lr"], inner_steps=spec["inner_steps"], loss=loss)
    return alg, None


def sampler(spec: dict[str, Any], bank: torch.Tensor | None, device: str = "cpu") -> Any:
    if spec["model"] == "mlp":
        return mf.data.SinusoidTasks(shots=spec["shots"], queries=spec["queries"], device=device)
    assert bank is not None
    return mf.data.EpisodeSampler(
        bank, ways=spec["ways"], shots=spec["shots"], queries=spec["queries"], device=device
    )


def inputs(spec: dict[str, Any], folder: Path) -> Path:
    """The float64 parameters and check batch both sides start from (and the image bank)."""
    alg, _ = build(spec)
    meta = mf.tree.cast(alg.init(torch.Generator().manual_seed(0)), torch.float64)
    arrays = {k: v.numpy() for k, v in mf.tree.flatten_with_paths(meta).items()}
    gen = torch.Generator().manual_seed(1)
    bank = None
    if spec["model"] == "conv4":
        bank = torch.randint(0, 256, (BANK_CLASSES, 20, 28, 28), generator=gen, dtype=torch.uint8)
        arrays["bank"] = bank.numpy()
    tasks = sampler(spec, bank)
    if spec["model"] == "conv4":
        tasks = tasks.replace(dtype=torch.float64)
    else:
        tasks = mf.data.SinusoidTasks(
            shots=spec["shots"], queries=spec["queries"], dtype=torch.float64
        )
    batch = tasks.sample(min(spec["tasks"], 8), gen)
    for name, field in zip(("sx", "sy", "qx", "qy"), batch, strict=True):
        arrays[f"batch.{name}"] = field.numpy()
    path = folder / "inputs.npz"
    np.savez(path, **arrays)
    return path


def worker(spec: dict[str, Any], inputs_path: Path, out: Path) -> None:
    """metafunc's side, in its own process: the float64 check gradient (on the CPU), then the
    step timed in float32 on ``spec['device']`` in each of ``spec['modes']`` (``eager`` or a
    ``torch.compile`` mode)."""
    data = dict(np.load(inputs_path))
    alg, _ = build(spec)
    meta64 = mf.tree.structure(alg.init()).unflatten(
        [torch.from_numpy(data[k]) for k in mf.tree.flatten_with_paths(alg.init())]
    )
    check = mf.TaskBatch(*(torch.from_numpy(data[f"batch.{f}"]) for f in ("sx", "sy", "qx", "qy")))
    grads, _, _ = alg.meta_grad(meta64, check)
    np.savez(out.with_suffix(".grads.npz"),
             **{k: v.numpy() for k, v in mf.tree.flatten_with_paths(grads).items()})  # fmt: skip
    bank = torch.from_numpy(data["bank"]) if "bank" in data else None
    device = spec["device"]
    tasks = sampler(spec, bank, device)
    meta = mf.tree.cast(meta64, torch.float32, device=device)
    opt = mf.optim.adam(1e-3)
    result: dict[str, Any] = {"impl": "metafunc", "torch": torch.__version__, "device": device}
    cache = out.with_suffix(".step.bin")
    for mode in spec["modes"]:
        label = {"eager": "eager", "default": "compiled"}.get(mode, mode)
        build_step = functools.partial(
            mf.compile_step, alg, opt, sampler=tasks, meta_batch=spec["tasks"],
            mode={"eager": None, "precompiled": "default"}.get(mode, mode),
            cache=cache if mode == "precompiled" else None,
        )  # fmt: skip
        if mode == "precompiled":  # saved by a first step, loaded by the step timed below,
            saving = build_step()  # as a later run of metafunc train loads it
            saving(saving.init(meta, mf.data.keys.key(0)), iteration=0)
        step = build_step()
        state = step.init(meta, mf.data.keys.key(0))
        start = time.perf_counter()
        for i in (0, 1):  # compiles (and makes the iteration dynamic); warms the eager step
            state, metrics = step(state, iteration=i)
        float(metrics["loss"])
        compile_s = time.perf_counter() - start
        times: list[float] = []
        began = time.perf_counter()
        for _ in range(spec["rounds"]):
            start = time.perf_counter()
            for i in range(spec["iters"]):
                state, metrics = step(state, iteration=i + 2)
            float(metrics["loss"])
            times.append((time.perf_counter() - start) / spec["iters"])
            if time.perf_counter() - began > spec["max_seconds"] and len(times) >= 2:
                break
        result[label] = {
            "ms": round(1e3 * statistics.median(times), 4),
            "rounds": len(times),
            "first_two_steps_s": round(compile_s, 3),
            "whole_graph": step.whole,
            "precompiled": step.precompiled,
        }
    out.write_text(json.dumps(result, indent=1) + "\n")


def run_worker(cmd: list[str], threads: int, timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
           if threads == 1 else os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    subprocess.run(cmd, check=True, env=env, timeout=timeout)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=0, help="steps per round (default by setting)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="timing budget per impl")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per process")
    parser.add_argument("--jax-python", default=str(ROOT / ".jax-venv" / "bin" / "python"))
    parser.add_argument("--device", default="cpu", help="metafunc's device (JAX runs on the CPU)")
    parser.add_argument("--modes", default="eager,default,precompiled",
                        help="metafunc's steps: eager, torch.compile modes, and precompiled "
                             "(compile_step's cache, loaded)")  # fmt: skip
    parser.add_argument("--no-jax", action="store_true", help="time metafunc alone")
    parser.add_argument("--out", default="benchmarks/results/bench_jax-cpu.json")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec_path, inputs_path, out = args.worker
        torch.set_num_threads(args.threads)
        worker(json.loads(Path(spec_path).read_text()), Path(inputs_path), Path(out))
        return {}
    if not args.no_jax and not Path(args.jax_python).exists():
        raise SystemExit(f"bench_jax: no {args.jax_python}; run bash benchmarks/jax/install.sh")
    rows = []
    for name in args.settings.split(","):
        spec = dict(SETTINGS[name], rounds=args.rounds, max_seconds=args.max_seconds,
                    device=args.device, modes=args.modes.split(","))  # fmt: skip
        spec["iters"] = args.iters or (50 if spec["model"] == "mlp" else 1)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "spec.json").write_text(json.dumps(spec))
            data = inputs(spec, folder)
            mine, theirs = folder / "metafunc.json", folder / "jax.json"
            run_worker([sys.executable, __file__, "--threads", str(args.threads), "--worker",
                        str(folder / "spec.json"), str(data), str(mine)],
                       args.threads, args.timeout)  # fmt: skip
            m = json.loads(mine.read_text())
            if args.no_jax:
                rows.append({"setting": name, "spec": spec, "metafunc": m})
                print(f"{name:18s} " + "  ".join(
                    f"{k} {m[k]['ms']:9.3f} ms (first two steps {m[k]['first_two_steps_s']:.1f} s)"
                    for k in m if isinstance(m[k], dict)), flush=True)  # fmt: skip
                continue
            run_worker([args.jax_python, str(ROOT / "benchmarks" / "jax" / "impl_jax.py"),
                        "--spec", str(folder / "spec.json"), "--inputs", str(data),
                        "--out", str(theirs)], args.threads, args.timeout)  # fmt: skip
            a = dict(np.load(mine.with_suffix(".grads.npz")))
            b = dict(np.load(theirs.with_suffix(".grads.npz")))
            assert a.keys() == b.keys(), (sorted(a), sorted(b))
            diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
            scale = sum(float((b[k] ** 2).sum()) for k in b) ** 0.5
            grad_error = diff / scale
            if grad_error > 1e-10:
                raise AssertionError(f"{name}: metafunc and JAX gradients differ by {grad_error}")
            j = json.loads(theirs.read_text())
        row = {"setting": name, "spec": spec, "grad_rel_error": grad_error, "metafunc": m, "jax": j}
        parts = [f"{name:18s} grad err {grad_error:.1e}  JAX {j['ms']:9.3f} ms (compile "
                 f"{j['compile_s']:.1f} s)"]  # fmt: skip
        for label in ("compiled", "precompiled", "eager"):
            if label in m:
                row[f"{label}_over_jax_speed"] = round(j["ms"] / m[label]["ms"], 3)
                parts.append(f"{label} {m[label]['ms']:9.3f} ms "
                             f"({row[f'{label}_over_jax_speed']:.2f}x JAX's speed, first two "
                             f"steps {m[label]['first_two_steps_s']:.1f} s)")  # fmt: skip
        rows.append(row)
        print("  ".join(parts), flush=True)
    result = {"machine": machine(torch.device(args.device)), "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
