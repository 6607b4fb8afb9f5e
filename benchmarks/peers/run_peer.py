"""Run one peer impl on one spec and write its result JSON.

    PYTHON benchmarks/peers/run_peer.py --impl learn2learn --spec spec.json --out result.json

Works with any interpreter that has torch (and numpy); the peer library is imported lazily, and a
missing one gives ``{"status": "missing", "reason": ...}``. The first iteration's meta-gradient is
saved next to ``--out`` as ``<out stem>.grad.pt`` (a flat dict in the protocol's names). See
``benchmarks/peers/README.md`` for every field.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[2])
if __package__ in (None, ""):  # run as a script: import siblings as benchmarks.peers.*
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = _REPO
    elif _REPO not in sys.path:
        sys.path.insert(0, _REPO)

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.peers.base import backward_label, resolve_backward  # noqa: E402
from benchmarks.peers.inputs import load_data  # noqa: E402
from benchmarks.peers.model import load_init, param_names  # noqa: E402
from benchmarks.peers.spec import Spec, load_spec  # noqa: E402

__all__ = ["BATCH_VARIANTS", "IMPLS", "main", "run"]

#: Impl name -> module. An ``--impl`` that is not a key but contains a dot is imported as a module.
IMPLS: dict[str, str] = {
    "plain": "benchmarks.peers.impl_plain",
    "funcvmap": "benchmarks.peers.impl_funcvmap",
    "learn2learn": "benchmarks.peers.impl_learn2learn",
    "higher": "benchmarks.peers.impl_higher",
    "torchopt": "benchmarks.peers.impl_torchopt",
    "torchopt-metasgd": "benchmarks.peers.impl_torchopt_metasgd",
    # the peers whose official examples backpropagate per task, with one backward of the mean
    "plain-batch": "benchmarks.peers.impl_plain",
    "learn2learn-batch": "benchmarks.peers.impl_learn2learn",
    "higher-batch": "benchmarks.peers.impl_higher",
    # one module, one variant per task-parallel strategy: build(..., variant=name)
    "metafunc": "benchmarks.peers.impl_metafunc",
    "metafunc-loop": "benchmarks.peers.impl_metafunc",
    "metafunc-threads": "benchmarks.peers.impl_metafunc",
    "metafunc-vmap": "benchmarks.peers.impl_metafunc",
    "metafunc-chunked": "benchmarks.peers.impl_metafunc",
    "metafunc-checkpoint": "benchmarks.peers.impl_metafunc",
    "metafunc-compile": "benchmarks.peers.impl_metafunc",
    "metafunc-compile-ro": "benchmarks.peers.impl_metafunc",
    "metafunc-malloc-default": "benchmarks.peers.impl_metafunc",
    "metafunc-unshared": "benchmarks.peers.impl_metafunc",
    "metafunc-reference": "benchmarks.peers.impl_metafunc",
}


#: The variants that backpropagate the mean once, whatever the spec's ``per_task_backward``.
BATCH_VARIANTS = frozenset(name for name in IMPLS if name.endswith("-batch"))


def _current_rss_kib() -> int:
    """Resident set size now (Linux ``/proc/self/statm``), else the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_times() -> tuple[float, float] | None:
    """(total, steal) CPU seconds of the whole machine so far (Linux ``/proc/stat``), or None.

    Steal is time the hypervisor gave this virtual machine's CPUs to others: on a shared host it
    is what makes the same median move between runs.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    return sum(fields[:8]) / tick, (fields[7] if len(fields) > 7 else 0) / tick


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _resolve_impl(impl: str) -> Any:
    if impl in IMPLS:
        return importlib.import_module(IMPLS[impl])
    if "." in impl:
        return importlib.import_module(impl)
    raise ValueError(
        f"run_peer: unknown impl {impl!r}; use one of {sorted(IMPLS)} or a module path "
        "(e.g. benchmarks.peers.impl_metafunc) that defines library_version() and build()."
    )


def matmul_rate(device: torch.device, dtype: torch.dtype, sync: Any) -> float:
    """The device's measured dense matmul rate (FLOP/s, best of 5 square matmuls) at ``dtype``
    under the current precision settings: the yardstick for achieved FLOP/s."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run(impl: str, spec: Spec, grad_path: Path) -> dict[str, Any]:
    """Set up ``impl`` for ``spec``, run warmup + timed iterations, return the result dict."""
    result: dict[str, Any] = {
        "impl": impl,
        "setting": spec.name,
        "spec": spec.to_json(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
    module = _resolve_impl(impl)
    result["description"] = getattr(module, "DESCRIPTION", "")
    try:
        result["impl_version"] = module.library_version()
    except ImportError as err:
        return {**result, "status": "missing", "reason": f"{type(err).__name__}: {err}"}
    reason = getattr(module, "unsupported", lambda _spec: None)(spec)
    if reason:
        return {**result, "status": "unsupported", "reason": reason}
    official = getattr(module, "PER_TASK_BACKWARD", None)
    if official is not None:  # a task loop: its official style unless told otherwise
        spec = resolve_backward(spec, official, force_batch=impl in BATCH_VARIANTS)
        result["spec"] = spec.to_json()
    result["backward"] = getattr(module, "backward_style", backward_label)(spec)

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device, dtype = torch.device(spec.device), getattr(torch, spec.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run_peer: spec.device={spec.device!r} but CUDA is not available.")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    inputs = (spec, load_init(spec, device, dtype), load_data(spec, device, dtype))
    variant = {"variant": impl} if impl.startswith("metafunc") and impl in IMPLS else {}
    peer = module.build(*inputs, **variant)
    names = list(peer.params)
    if names != param_names(spec):
        raise ValueError(f"run_peer: {impl}.build gave params {names}; need {param_names(spec)}.")
    opt = torch.optim.Adam(list(peer.params.values()), lr=spec.outer_lr)

    gc.collect()
    sync()
    rss_setup_kib = _current_rss_kib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        cuda_setup = torch.cuda.memory_allocated(device)
    times_ms: list[float] = []
    cpu_before = _cpu_times()
    losses: list[float] = []
    for it in range(spec.warmup + spec.iters):
        opt.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        loss = peer.forward_backward()
        sync()
        t1 = time.perf_counter()
        losses.append(float(loss))
        if it == 0:
            missing = [k for k, p in peer.params.items() if p.grad is None]
            if missing:
                raise RuntimeError(f"run_peer: {impl} left no gradient on {missing}.")
            grads = {k: p.grad.detach().cpu().clone() for k, p in peer.params.items()}
            torch.save(grads, grad_path)
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        if it >= spec.warmup:
            times_ms.append((t1 - t0 + t3 - t2) * 1000.0)
            spent = sum(times_ms) / 1000.0
            if spec.max_seconds is not None and len(times_ms) >= 3 and spent >= spec.max_seconds:
                break

    cpu_after = _cpu_times()
    steal = None
    if cpu_before is not None and cpu_after is not None and cpu_after[0] > cpu_before[0]:
        steal = (cpu_after[1] - cpu_before[1]) / (cpu_after[0] - cpu_before[0])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    memory: dict[str, Any] = {
        "cpu_rss_setup_mib": rss_setup_kib / 1024,
        "cpu_peak_rss_mib": peak_kib / 1024,
        "cpu_peak_rss_increase_mib": (peak_kib - rss_setup_kib) / 1024,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        memory["cuda_setup_mib"] = cuda_setup / 2**20
        memory["cuda_peak_mib"] = peak / 2**20
        memory["cuda_peak_increase_mib"] = (peak - cuda_setup) / 2**20
    median = statistics.median(times_ms) if times_ms else float("nan")
    if impl == "plain":  # the work every impl does, counted once where no transform hides it
        opt.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            peer.forward_backward()
        result["flops_per_iteration"] = counter.get_total_flops()
        result["matmul_flop_per_s"] = matmul_rate(device, dtype, sync)
    return {
        **result,
        "status": "ok",
        "meta_loss_first": losses[0],
        "meta_losses": losses,
        "grad_path": str(grad_path.resolve()),
        "times_ms": times_ms,
        "timed_iters": len(times_ms),
        "median_ms": median,
        "tasks_per_s": spec.meta_batch * 1000.0 / median if times_ms else float("nan"),
        "peak_memory_kind": "cuda_allocated" if cuda else "cpu_rss",
        "peak_memory_mib": memory["cuda_peak_mib"] if cuda else memory["cpu_peak_rss_mib"],
        "peak_memory_increase_mib": memory[
            "cuda_peak_increase_mib" if cuda else "cpu_peak_rss_increase_mib"
        ],
        "memory": memory,
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "allocator": allocator_of(peer),
        "cpu_steal_fraction": steal,
    }


def allocator_of(peer: object) -> str:
    """How this process's ``malloc`` was set: by the impl (``metafunc.tune_cpu_allocator``), by
    glibc's environment variables, both listed, or ``C library default``."""
    env = [
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
    ]
    parts = ["tuned by the impl"] if getattr(peer, "allocator_tuned", False) else []
    if env:
        parts.append("environment: " + " ".join(env))
    return "; ".join(parts) or "C library default"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: write the result JSON to ``--out``; exit 0 unless the run raised."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True, help=f"one of {sorted(IMPLS)} or a module path")
    parser.add_argument("--spec", required=True, type=Path, help="spec JSON")
    parser.add_argument("--out", required=True, type=Path, help="result JSON to write")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.impl, load_spec(args.spec), out.with_suffix(".grad.pt"))
        code = 0
    except Exception as err:
        result = {
            "impl": args.impl,
            "status": "error",
            "reason": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc()[-4000:],
        }
        code = 1
    out.write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
