"""How far each compute precision moves the meta-gradient: the accuracy check of ``--precision``.

    python benchmarks/bench_precision.py                       # CPU: float32 and bf16
    python benchmarks/bench_precision.py --device cuda         # also ieee and tf32
    python benchmarks/bench_precision.py --layouts default,nchw

For each preset it samples one real meta-batch (``METAFUNC_DATA``), computes the meta-gradient
in float64 (the reference), then in float32 under each precision of the harness (and with
``--layouts``, in the default precision with ``channels_last`` True (``channels-last``) or False
(``nchw``); ``default`` is the models' default, channels-last on the CPU), and reports the
relative error ``|g - g64| / |g64|``, the cosine with the reference, the meta-loss and the time
of one meta-gradient. Prints a table and writes JSON (``--out``).
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
    channels_last: bool | None = None,
) -> dict[str, Any]:
    extra = {} if meta_batch is None else {"meta_batch": meta_batch}
    base = {**PRESETS[preset], "preset": preset, "device": device, **extra}
    base["data_root"] = os.environ.get("METAFUNC_DATA")
    ref_run = build(Config.from_dict({**base, "dtype": "float64"}))
    run = build(Config.from_dict({**base, "precision": precision, "channels_last": channels_last}))
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
        "layout": {None: "default", True: "channels-last", False: "nchw"}[channels_last],
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
        "--layouts",
        default="default",
        help="from default,channels-last,nchw: channels_last None (the precisions), True, False",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = args.device.startswith("cuda")
    default = "default,ieee,tf32,bf16" if cuda else "default,bf16"
    layouts = args.layouts.split(",")
    flags = {"channels-last": True, "nchw": False}
    if not set(layouts) <= {"default", *flags}:
        p.error(f"--layouts: names from default, channels-last, nchw; got {args.layouts!r}")
    rows = []
    for preset in args.presets.split(","):
        if "default" in layouts:
            for precision in (args.precisions or default).split(","):
                rows.append(measure(preset, precision, args.device, args.meta_batch))
        for layout, flag in flags.items():
            if layout in layouts:
                rows.append(measure(preset, "default", args.device, args.meta_batch, flag))
    head = (
        f"{'preset':24s} {'precision':9s} {'layout':13s} {'rel err':>9s} {'cosine':>8s} "
        f"{'loss':>8s} {'s':>7s}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['preset']:24s} {r['precision']:9s} {r['layout']:13s} {r['grad_rel_err']:9.2e} "
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
