"""Peak memory and time of one second-order meta-iteration against the number of inner steps.

    python benchmarks/bench_memory.py                       # 20-way 1-shot, mb 16, CPU
    python benchmarks/bench_memory.py --steps 1,5,10,25 --impls metafunc,metafunc-checkpoint

Each (impl, steps) runs in its own process through the peer protocol (``benchmarks/peers``), so
the peak is that process's (RSS on CPU, ``max_memory_allocated`` on CUDA). Writes a table and
``benchmarks/results/bench_memory-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.peers.driver import format_table, prepare, python_for, run_impl  # noqa: E402
from benchmarks.peers.spec import setting  # noqa: E402

COLUMNS = ["inner_steps", "impl", "status", "median_ms", "peak_memory_mib", "peak_increase_mib"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="omniglot-20w1s")
    p.add_argument("--steps", default="1,5,10,25", help="comma-separated inner step counts")
    p.add_argument("--impls", default="metafunc,metafunc-checkpoint")
    p.add_argument("--meta-batch", type=int, default=None, help="default: the setting's")
    p.add_argument("--queries", type=int, default=None, help="per class; default: the setting's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    workdir = _REPO / "runs" / "bench_memory" / time.strftime("%Y%m%d-%H%M%S")
    changes = {k: v for k, v in (("meta_batch", args.meta_batch), ("queries", args.queries)) if v}
    rows: list[dict[str, Any]] = []
    out = args.out or _REPO / "benchmarks" / "results" / f"bench_memory-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "setting": args.setting, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": args.threads, "torch": torch.__version__, **changes,
    }  # fmt: skip

    def write(rows: list[dict[str, Any]]) -> None:
        out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(format_table(rows, COLUMNS, markdown=True) + "\n")

    for steps in [int(s) for s in args.steps.split(",")]:
        spec = setting(
            args.setting, inner_steps=steps, device=args.device, threads=args.threads,
            warmup=1, iters=args.iters, name=f"{args.setting}-{steps}steps", **changes,
        )  # fmt: skip
        spec = prepare(spec, workdir, seed=0)
        for impl in args.impls.split(","):
            res = run_impl(python_for(impl, {}), impl, spec, workdir)
            row = {
                "inner_steps": steps, "impl": impl, "status": res["status"],
                "median_ms": res.get("median_ms"), "peak_memory_mib": res.get("peak_memory_mib"),
                "peak_increase_mib": res.get("peak_memory_increase_mib"),
                "reason": res.get("reason", ""),
            }  # fmt: skip
            rows.append(row)
            print(format_table([row], list(row)).splitlines()[-1], flush=True)
            write(rows)  # after every row: a run stopped part-way keeps what it measured
    print(format_table(rows, [*COLUMNS, "reason"]))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
