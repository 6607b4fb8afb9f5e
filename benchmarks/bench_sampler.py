"""Time the episode sampler and the Omniglot loader; print a table and write JSON.

The headline number: the median time to draw one meta-batch of 32 Omniglot 20-way 1-shot 5-query
tasks (28x28, training classes with 4 rotations, as in MAML), after warm-up. Target: <= 5 ms on
a 2-core CPU. Also timed: the same without rotations (test classes), the same with one torch
thread, the first decode of the full Omniglot set into an empty cache, and the cached reload.

Usage:
    METAFUNC_DATA=/path/holding/omniglot-py python benchmarks/bench_sampler.py
    python benchmarks/bench_sampler.py --device cuda --skip-decode

Without Omniglot data the sampler runs on random uint8 images of the same shape (noted in the
JSON); the sampler's cost does not depend on pixel values.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metafunc.data import EpisodeSampler, get_benchmark, load_omniglot


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (none where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:  # the blank line after the first processor
                break
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_model() -> str | None:
    """``'family F model M'`` from ``/proc/cpuinfo`` (a VM's ``model name`` may be bare)."""
    info = _cpuinfo()
    if "cpu family" not in info or "model" not in info:
        return None
    return f"family {info['cpu family']} model {info['model']}"


def commit() -> str | None:
    """The checkout's ``git`` commit, with ``+dirty`` when tracked files differ from it; where
    there is no git checkout (a copy of the tree on a lent GPU machine), ``$METAFUNC_COMMIT``."""
    root = Path(__file__).resolve().parents[1]
    given = os.environ.get("METAFUNC_COMMIT") or None
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
    except OSError:
        return given
    if head.returncode != 0:
        return given
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_model": cpu_model(),
        "commit": commit(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_calls(
    fn: Callable[[], Any], *, draws: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Milliseconds per call (median, 10th and 90th percentile) over ``draws`` after ``warmup``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, cpu = [], []
    for _ in range(draws):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(9 * len(times)) // 10],
        # CPU seconds of this process (all threads) per call: unlike wall time, not inflated
        # by waiting for a core on a shared machine (but spin-waiting threads count).
        "cpu_median_ms": statistics.median(cpu),
        "draws": draws,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", default=os.environ.get("METAFUNC_DATA"), help="folder holding omniglot-py/"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument(
        "--skip-decode", action="store_true", help="do not time the first full decode"
    )
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()
    device = torch.device(args.device)
    info = machine(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {"machine": info, "config": vars(args) | {"root": str(args.root)}}
    rows: list[tuple[str, str]] = []

    root = Path(args.root) if args.root else None
    if root is not None and not (root / "omniglot-py").is_dir():
        root = None
    with tempfile.TemporaryDirectory(prefix="metafunc-bench-cache-") as cache:
        if root is not None and not args.skip_decode:
            start = time.perf_counter()
            for source in ("background", "evaluation"):
                load_omniglot(root, source, cache_dir=cache)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for source in ("background", "evaluation"):
                load_omniglot(root, source, cache_dir=cache)
            cached = time.perf_counter() - start
            results["omniglot_load"] = {
                "first_decode_s": first,
                "cached_load_s": cached,
                "images": 32460,
            }
            rows += [
                ("Omniglot full set, first decode (32,460 PNGs)", f"{first:.2f} s"),
                ("Omniglot full set, cached reload", f"{cached * 1e3:.1f} ms"),
            ]
        config = dict(ways=args.ways, shots=args.shots, queries=args.queries, device=device)
        if root is not None:
            bench = get_benchmark("omniglot", root, cache_dir=cache, **config)
            train, test = bench.train, bench.test
            source = "omniglot (Vinyals split: 1100 train characters x 4 rotations, 423 test)"
        else:
            images = torch.randint(
                0,
                256,
                (1200, 20, 28, 28),
                dtype=torch.uint8,
                generator=torch.Generator().manual_seed(0),
            )
            train = EpisodeSampler(images, rotations=(0, 90, 180, 270), **config)
            test = EpisodeSampler(images[:423], **config)
            source = "synthetic uint8 [1200, 20, 28, 28] (no Omniglot data found)"
    assert isinstance(train, EpisodeSampler) and isinstance(test, EpisodeSampler)
    results["data"] = source
    generator = torch.Generator().manual_seed(0)
    label = f"{args.tasks} x {args.ways}-way {args.shots}-shot {args.queries}-query"
    timing: dict[str, dict[str, float]] = {}
    for name, sampler in (("train_rotations", train), ("test_no_rotations", test)):
        timing[name] = time_calls(
            functools.partial(sampler.sample, args.tasks, generator),
            draws=args.draws,
            warmup=args.warmup,
            device=device,
        )
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        timing["train_rotations_1_thread"] = time_calls(
            lambda: train.sample(args.tasks, generator),
            draws=args.draws,
            warmup=args.warmup,
            device=device,
        )
        torch.set_num_threads(threads)
    results["sample"] = timing
    for name, t in timing.items():
        rows.append(
            (
                f"sample {label}, {name.replace('_', ' ')}",
                f"{t['median_ms']:.2f} ms (p10 {t['p10_ms']:.2f}, p90 {t['p90_ms']:.2f}; "
                f"CPU {t['cpu_median_ms']:.2f} ms)",
            )
        )
    results["machine"]["loadavg_before"] = load_before
    results["machine"]["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["target_ms"] = 5.0
    results["meets_target"] = timing["train_rotations"]["median_ms"] <= 5.0

    width = max(len(r[0]) for r in rows)
    print(
        f"metafunc sampler benchmark: {info['cpu']}, {info['usable_cores']} cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads), {device}"
    )
    print(f"data: {source}")
    print(f"load average before / after: {load_before} / {results['machine']['loadavg_after']}")
    print(f"{'what':<{width}}  time")
    print(f"{'-' * width}  {'-' * 48}")
    for what, value in rows:
        print(f"{what:<{width}}  {value}")
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / f"bench_sampler-{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
