"""How far each compute precision moves the meta-gradient: the accuracy check of ``--precision``.

    python benchmarks/bench_precision.py                       # CPU: float32 and bf16
    python benchmarks/bench_precision.py --device cuda         # also ieee and tf32
    python benchmarks/bench_precision.py --kernels auto,reference

For each preset it samples one real meta-batch (``METAFUNC_DATA``), computes the meta-gradient
in float64 (the reference), then in float32 under each precision of the harness (and with
``--kernels``, in the default precision with the config's ``kernels`` set to ``reference`` or
``cpu``; ``auto``, the config's default, is ``cpu`` on the CPU), and reports the relative error
``|g - g64| / |g64|``, the cosine with the reference, the meta-loss and the time of one
meta-gradient. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from metafunc import tree as mt
from metafunc.harness import Config
from metafunc.harness.config import PRESETS
from metafunc.harness.run import build, init_meta


def measure(
    preset: str,
    precision: str,
    device: str,
    meta_batch: int | None,
    kernels: str = "auto",
) -> dict[str, Any]:
    extra = {} if meta_batch is None else {"meta_batch": meta_batch}
    base = {**PRESETS[preset], "preset": preset, "device": device, **extra}
    base["data_root"] = os.environ.get("METAFUNC_DATA")
    ref_run = build(Config.from_dict({**base, "dtype": "float64"}))
    run = build(Config.from_dict({**base, "precision": precision, "kernels": kernels}))
    batch64 = ref_run.train_tasks.sample(run.config.meta_batch, torch.Generator().manual_seed(0))
    meta64 = init_meta(ref_run, 0)
    g64, loss64, _ = ref_run.meta_grad(meta64, batch64)
    meta = mt.map(lambda x: x.float(), meta64)
    batch = type(batch64)(*(f.float() if f.is_floating_point() else f for f in batch64))
    run.meta_grad(meta, batch)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    g, loss, _ = run.meta_grad(meta, batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    g = mt.map(lambda x: x.double(), g)
    err = float(mt.global_norm(mt.sub(g, g64)) / mt.global_norm(g64))
    cos = float(mt.vdot(g, g64) / (mt.global_norm(g) * mt.global_norm(g64)))
    return {
        "preset": preset, "precision": precision, "meta_batch": run.config.meta_batch,
        "kernels": kernels,
        "grad_rel_err": err, "grad_cosine": cos, "loss": float(loss),
        "loss_float64": float(loss64), "seconds": seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="maml-omniglot-5w1s,maml-omniglot-20w1s")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precisions", default=None, help="default: all that the device supports")
    p.add_argument("--meta-batch", type=int, default=None, help="override the presets'")
    p.add_argument(
        "--kernels",
        default="auto",
        help="from auto,reference,cpu: the config's kernels (auto: with every precision)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = args.device.startswith("cuda")
    default = "default,ieee,tf32,bf16" if cuda else "default,bf16"
    kernels = args.kernels.split(",")
    if not set(kernels) <= {"auto", "reference", "cpu"}:
        p.error(f"--kernels: names from auto, reference, cpu; got {args.kernels!r}")
    rows = []
    for preset in args.presets.split(","):
        if "auto" in kernels:
            for precision in (args.precisions or default).split(","):
                rows.append(measure(preset, precision, args.device, args.meta_batch))
        for name in ("reference", "cpu"):
            if name in kernels:
                rows.append(measure(preset, "default", args.device, args.meta_batch, name))
    head = (
        f"{'preset':24s} {'precision':9s} {'kernels':9s} {'rel err':>9s} {'cosine':>8s} "
        f"{'loss':>8s} {'s':>7s}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['preset']:24s} {r['precision']:9s} {r['kernels']:9s} {r['grad_rel_err']:9.2e} "
            f"{r['grad_cosine']:8.5f} {r['loss']:8.4f} {r['seconds']:7.3f}"
        )
    if args.out is not None:
        device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
        meta = {"date": time.strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
