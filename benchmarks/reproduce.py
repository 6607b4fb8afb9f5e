"""Run the papers' presets through the harness and keep what a results table needs.

    python benchmarks/reproduce.py maml-sinusoid protonet-omniglot-20w1s=3000
    python benchmarks/reproduce.py --table          # the README's markdown table

``PRESET=N`` shortens a preset to ``N`` iterations (the papers' counts take days on a CPU). Each
run trains in ``runs/reproduce/<preset>`` (resumed exactly if a previous session left a
checkpoint there, or extended to ``N`` if it finished with fewer), then ``config.json``,
``eval.json``, ``metrics.jsonl`` and a ``run.json`` with
the machine, date, threads and wall time are copied to ``benchmarks/results/reproduce/<preset>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from metafunc.harness.config import PRESETS

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "reproduce"

# Published numbers (../shared/REFERENCE.md): preset -> (metric, {steps: value}, source)
PAPER: dict[str, tuple[str, dict[str, str], str]] = {
    "maml-sinusoid": ("MSE", {"1": "0.67", "5": "0.38", "10": "0.35"}, "Finn et al. 2017"),
    "baseline-sinusoid": ("MSE", {"1": "2.41", "5": "2.23", "10": "2.19"}, "Finn et al. 2017"),
    "maml-omniglot-5w1s": ("acc %", {"3": "98.7 ± 0.4"}, "Finn et al. 2017"),
    "maml-omniglot-20w1s": ("acc %", {"5": "95.8 ± 0.3"}, "Finn et al. 2017"),
    "fomaml-omniglot-5w1s": ("acc %", {"3": "98.3 ± 0.5"}, "Nichol et al. 2018"),
    "fomaml-omniglot-20w1s": ("acc %", {"5": "89.4 ± 0.5"}, "Nichol et al. 2018"),
    "anil-omniglot-20w1s": ("acc %", {"5": "96.2 ± 0.5"}, "Raghu et al. 2019"),
    "mamlpp-omniglot-20w1s": ("acc %", {"5": "–"}, "Antoniou et al. 2018 (5-way only)"),
    "protonet-omniglot-5w1s": ("acc %", {"0": "98.8"}, "Snell et al. 2017"),
    "protonet-omniglot-20w1s": ("acc %", {"0": "96.0"}, "Snell et al. 2017"),
    "reptile-omniglot-5w1s": ("acc %", {"50": "97.68 ± 0.04"}, "Nichol et al. 2018 (transd.)"),
    "baseline-omniglot-5w1s": ("acc %", {"100": "–"}, "Chen et al. 2019 (no Omniglot row)"),
    "r2d2-omniglot-5w1s": ("acc %", {"0": "–"}, "Bertinetto et al. 2019 (other network)"),
    "metaoptnet-omniglot-5w1s": ("acc %", {"0": "–"}, "Lee et al. 2019 (no Omniglot row)"),
    "metaoptnet-rr-omniglot-5w1s": ("acc %", {"0": "–"}, "Lee et al. 2019 (no Omniglot row)"),
    # Lake et al. 2015's within-alphabet 20-way one-shot runs: error, humans 4.5%, BPL 3.3%
    "protonet-omniglot-lake": ("error %", {"0": "8.0 Siamese, 4.5 humans"}, "Lake et al. 2015"),
    "protonet-omniglot-small1": ("error %", {"0": "24.0 deep convnet"}, "Lake et al. 2015"),
    "protonet-omniglot-small2": ("error %", {"0": "22.3 deep convnet"}, "Lake et al. 2015"),
    "maml-omniglot-lake": ("error %", {"5": "8.0 Siamese, 4.5 humans"}, "Lake et al. 2015"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}"


def run_one(preset: str, iterations: int | None, runs: Path, extra: list[str]) -> None:
    run_dir = runs / preset
    config = run_dir / "config.json"
    saved = json.loads(config.read_text()) if config.is_file() else {}
    same = saved.get("preset") == preset and iterations in (None, saved.get("iterations"))
    longer = saved.get("preset") == preset and (iterations or 0) > saved.get("iterations", 0)
    resume = (same or longer) and any(run_dir.glob("ckpt-*.safetensors"))
    finished = same and (run_dir / "eval.json").is_file()
    cmd = [sys.executable, "-m", "metafunc", "train", "--quiet"]
    if finished:  # trained before (e.g. by an interrupted queue): collect it
        cmd = []
    elif resume:  # continue an interrupted run, or extend a finished one to more iterations
        cmd += ["--resume", str(run_dir)]
        if longer:
            cmd += ["--iterations", str(iterations)]
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd += ["--preset", preset, "--run-dir", str(run_dir), *extra]
        if iterations is not None:
            cmd += ["--iterations", str(iterations)]
    start = time.perf_counter()
    if cmd:
        print(f"$ {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    if finished:
        wall = json.loads((run_dir / "eval.json").read_text())["train_seconds"]
    out = RESULTS / preset
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "eval.json", "metrics.jsonl"):
        shutil.copy2(run_dir / name, out / name)
    cfg = json.loads((run_dir / "config.json").read_text())
    earlier = out / "run.json"  # a resumed run adds the wall time its first part took
    previous = json.loads(earlier.read_text()) if resume and earlier.is_file() else {}
    if finished or previous.get("preset") != preset:
        previous = {}
    info = {
        "preset": preset,
        "iterations": cfg["iterations"],
        "wall_seconds": round(wall + previous.get("wall_seconds", 0.0), 1),
        "machine": machine(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "date": date.today().isoformat(),
        "command": "python benchmarks/reproduce.py "
        + (f"{preset}={iterations}" if iterations else preset),
    }
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)


def table() -> str:
    """One markdown row per committed result: ours at the paper's step counts vs the paper."""
    rows = [
        "| preset (method, setting) | metric, inner steps | ours ± 95% CI | paper | iterations "
        "(preset's full) | hardware | wall | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, (metric, paper, source) in PAPER.items():
        folder = RESULTS / preset
        if not (folder / "eval.json").is_file():
            continue
        ev = json.loads((folder / "eval.json").read_text())
        info = json.loads((folder / "run.json").read_text())
        cfg = json.loads((folder / "config.json").read_text())
        key, scale, digits = ("loss", 1.0, 2) if metric == "MSE" else ("accuracy", 100.0, 1)
        steps = [k for k in paper if k in ev[key]]
        flip = metric == "error %"  # Lake et al. report the error, one minus the accuracy
        means = {k: (1.0 - v["mean"] if flip else v["mean"]) for k, v in ev[key].items()}
        ours = " / ".join(
            f"{scale * means[k]:.{digits}f} ± {scale * ev[key][k]['ci95']:.{digits}f}"
            for k in steps
        )
        theirs = " / ".join(paper[k] for k in steps)
        full = PRESETS[preset]["iterations"]
        hardware = info["machine"].replace("Intel(R) Xeon(R) Processor", "Xeon")
        hardware += f", {info['torch_threads']} thread(s)"
        rows.append(
            f"| {preset} | {metric}, {' / '.join(steps)} | {ours} | {theirs} ({source}) | "
            f"{cfg['iterations']:,} ({full:,}) | {hardware} | "
            f"{info['wall_seconds'] / 60:.0f} min | `{info['command']}` |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("presets", nargs="*", help="PRESET or PRESET=ITERATIONS")
    parser.add_argument("--runs", default="runs/reproduce", help="training folders")
    parser.add_argument("--table", action="store_true", help="print the results table")
    args, extra = parser.parse_known_args()
    for item in args.presets:
        name, _, iters = item.partition("=")
        run_one(name, int(iters) if iters else None, Path(args.runs), extra)
    if args.table or not args.presets:
        print(table())


if __name__ == "__main__":
    main()
