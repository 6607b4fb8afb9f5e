"""Drive the peer benchmark: write inputs, run each impl in its own process, compare, tabulate.

    python benchmarks/peers/driver.py --check                      # float64 agreement, all settings
    python benchmarks/peers/driver.py --settings omniglot-5w1s     # time every impl (float32, CPU)

Peers run under ``.peers-venv/bin/python`` when it exists (else this interpreter); impls named
``metafunc*`` run under this interpreter; ``--python-for IMPL=PY`` overrides either.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: import siblings as benchmarks.peers.*
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(_REPO)
    elif str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from benchmarks.bench_sampler import machine  # noqa: E402
from benchmarks.peers.inputs import make_inputs  # noqa: E402
from benchmarks.peers.spec import SETTINGS, Spec, setting, tiny  # noqa: E402

__all__ = [
    "DEFAULT_IMPLS",
    "PEER_IMPLS",
    "combine_rounds",
    "compare_gradients",
    "format_table",
    "make_inputs",
    "prepare",
    "run_impl",
    "speedups",
]

RUN_PEER = Path(__file__).resolve().parent / "run_peer.py"
PEERS_PYTHON = _REPO / ".peers-venv" / "bin" / "python"
#: The peers (every impl not named ``metafunc*``), reference first.
PEER_IMPLS = ("plain", "funcvmap", "learn2learn", "higher", "torchopt", "torchopt-metasgd")
#: What a run compares unless ``--impls`` says otherwise: the reference, metafunc's default and
#: its per-task loop, then every peer.
DEFAULT_IMPLS = ("plain", "metafunc", "metafunc-threads", *PEER_IMPLS[1:])


def prepare(spec: Spec, workdir: str | Path, seed: int = 0) -> Spec:
    """Point ``spec`` at ``workdir/<name>-init.pt`` / ``-data.pt`` and write them with ``seed``."""
    workdir = Path(workdir).resolve()
    spec = spec.replace(
        init_path=str(workdir / f"{spec.name}-init.pt"),
        data_path=str(workdir / f"{spec.name}-data.pt"),
    )
    make_inputs(spec, seed)
    return spec


def run_impl(
    python_exe: str | Path,
    impl: str,
    spec: Spec,
    workdir: str | Path,
    *,
    timeout: float = 3600.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``impl`` on ``spec`` in a subprocess of ``python_exe``; return its result dict.

    ``env`` adds environment variables for the subprocess (e.g. glibc's ``MALLOC_*``).
    The spec's init and data files must exist (see ``prepare``). The spec is written to
    ``workdir/<name>-<impl>.spec.json``, the result to ``workdir/<name>-<impl>.json``. A crash, a
    timeout or unreadable output gives ``{"status": "error" | "timeout", "reason": ...}``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for path in (spec.init_path, spec.data_path):
        if not Path(path).is_absolute() or not Path(path).exists():
            raise ValueError(
                f"run_impl({impl!r}): {path!r} is not an existing absolute path; write the inputs "
                "first with spec = prepare(spec, workdir, seed)."
            )
    stem = f"{spec.name}-{impl}".replace("/", "_")
    spec_path = spec.save(workdir / f"{stem}.spec.json")
    out_path = workdir / f"{stem}.json"
    out_path.unlink(missing_ok=True)
    cmd = [str(python_exe), str(RUN_PEER), "--impl", impl, "--spec", str(spec_path)]
    cmd += ["--out", str(out_path)]
    base = {"impl": impl, "setting": spec.name, "python": str(python_exe)}
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "reason": f"no result within {timeout:.0f} s"}
    try:
        result: dict[str, Any] = json.loads(out_path.read_text())
    except (OSError, ValueError) as err:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {**base, "status": "error", "reason": f"exit {proc.returncode}, {err}: {tail}"}
    result["python_exe"] = str(python_exe)
    return result


def _errors(
    grad: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]
) -> tuple[dict[str, float], float]:
    """Per-tensor floored relative errors, and the global one ``max|g - g_ref| / G``."""
    scale = max(max(float(r.abs().max()) for r in ref.values()), torch.finfo(torch.float64).tiny)
    diffs = {k: float((grad[k].double() - r.double()).abs().max()) for k, r in ref.items()}
    per_tensor = {k: diffs[k] / max(float(r.abs().max()), 1e-3 * scale) for k, r in ref.items()}
    return per_tensor, max(diffs.values()) / scale


def compare_gradients(
    results: Mapping[str, Mapping[str, Any]],
    reference_impl: str = "plain",
    rtol: float = 1e-6,
) -> list[dict[str, Any]]:
    """Compare every impl's first-iteration meta-loss and meta-gradient with the reference's.

    ``results`` maps impl name to ``run_impl``'s dict. For each tensor the error is
    ``max|g - g_ref| / max(max|g_ref|, 1e-3 * G)`` with ``G`` the largest reference gradient entry
    anywhere, so tensors whose gradient is zero in exact arithmetic (conv biases before batch norm)
    are judged on the global scale instead of their rounding noise. ``ok`` needs the loss and
    every tensor within ``rtol``. Also reported: ``grad_global_rel_err = max|g - g_ref| / G``.

    Scale of rounding noise: float64 impls agree to ~1e-12; in float32 even ``plain`` differs from
    its own float64 result by ~1e-3 per tensor (and ~1e-4 globally) on omniglot-5w1s, so float32
    comparisons are indicative only.

    Returns one row per impl: ``impl, status, loss_rel_err, grad_rel_err`` (max over tensors),
    ``grad_global_rel_err, worst_param`` (None when all errors are 0), ``ok``, and ``reason`` when
    the impl did not run.
    """
    if reference_impl not in results or results[reference_impl].get("status") != "ok":
        got = results.get(reference_impl, {}).get("status", "absent")
        raise ValueError(
            f"compare_gradients: the reference {reference_impl!r} has status {got!r}; it must have "
            "run ('ok'). Pass another reference_impl= or fix the reference run."
        )
    ref = results[reference_impl]
    ref_grad = torch.load(ref["grad_path"], map_location="cpu", weights_only=True)
    ref_loss = float(ref["meta_loss_first"])
    rows: list[dict[str, Any]] = []
    for impl, res in results.items():
        row: dict[str, Any] = {"impl": impl, "status": res.get("status", "?")}
        if row["status"] != "ok":
            rows.append({**row, "ok": None, "reason": res.get("reason", "")})
            continue
        grad = torch.load(res["grad_path"], map_location="cpu", weights_only=True)
        if list(grad) != list(ref_grad):
            rows.append({**row, "ok": False, "reason": f"parameter names differ: {list(grad)}"})
            continue
        errs, global_err = _errors(grad, ref_grad)
        worst = max(errs, key=errs.__getitem__)
        loss_err = abs(float(res["meta_loss_first"]) - ref_loss) / max(abs(ref_loss), 1e-300)
        ok = loss_err <= rtol and errs[worst] <= rtol
        rows.append(
            {
                **row,
                "loss_rel_err": loss_err,
                "grad_rel_err": errs[worst],
                "grad_global_rel_err": global_err,
                "worst_param": worst if errs[worst] > 0 else None,
                "ok": ok,
            }
        )
    return rows


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, markdown: bool = False
) -> str:
    """A fixed-width text table of ``rows`` (floats in ``%.3g``), one line per row; with
    ``markdown``, a GitHub markdown table."""

    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        return "\n".join([lines[0], "|" + "---|" * len(columns), *lines[1:]])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table)
    return "\n".join(line.rstrip() for line in lines)


def speedups(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per setting and metafunc impl: ``peer median / metafunc median`` for every timed peer
    (> 1 means metafunc is faster) and the peak-memory ratio to each peer."""
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        ok = [r for r in rows if r["setting"] == name and r["status"] == "ok"]
        ours = [r for r in ok if r["impl"].startswith("metafunc")]
        peers = [r for r in ok if not r["impl"].startswith("metafunc")]
        for mine in ours:
            row: dict[str, Any] = {"setting": name, "impl": mine["impl"]}
            for peer in peers:
                row[f"x {peer['impl']}"] = round(peer["median_ms"] / mine["median_ms"], 2)
            if peers:
                fastest = min(peers, key=lambda r: r["median_ms"])
                row["fastest peer"] = fastest["impl"]
                row["x fastest"] = round(fastest["median_ms"] / mine["median_ms"], 2)
                theirs = fastest.get("round_medians_ms") or []
                ours = mine.get("round_medians_ms") or []
                per_round = [t / o for t, o in zip(theirs, ours, strict=True)]
                if len(per_round) > 1:  # the same ratio within each round: its spread
                    row["x fastest by round"] = f"{min(per_round):.2f}-{max(per_round):.2f}"
                row["mem / fastest"] = round(
                    mine["peak_memory_mib"] / fastest["peak_memory_mib"], 2
                )
            out.append(row)
    return out


def python_for(impl: str, overrides: Mapping[str, str]) -> str:
    if impl in overrides:
        return overrides[impl]
    if impl.startswith("metafunc"):
        return sys.executable
    return str(PEERS_PYTHON) if PEERS_PYTHON.exists() else sys.executable


def run_all(
    spec: Spec,
    impls: Sequence[str],
    workdir: Path,
    seed: int,
    overrides: Mapping[str, str],
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
) -> dict[str, dict[str, Any]]:
    spec = prepare(spec, workdir, seed)
    results = {}
    for impl in impls:
        python_exe = python_for(impl, overrides)
        results[impl] = run_impl(python_exe, impl, spec, workdir, timeout=timeout, env=env)
        res = results[impl]
        done = f"{res['median_ms']:.1f} ms" if res.get("median_ms") is not None else ""
        print(f"  {spec.name:28s} {impl:18s} {res['status']} {done}".rstrip(), flush=True)
    return results


def combine_rounds(rounds: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One result per impl from several rounds of ``run_all``: the first round's result (its
    gradient, which every round computes alike) with ``median_ms`` the median of the rounds'
    medians, ``round_medians_ms`` each round's, the largest peak memory (each round's peak
    increase in ``round_peak_increase_mib``: RSS moves by a tenth between identical processes)
    and the mean steal. An impl that failed in any round keeps that round's failure."""
    out: dict[str, dict[str, Any]] = {}
    for impl in rounds[0]:
        runs = [r[impl] for r in rounds]
        bad = next((r for r in runs if r.get("status") != "ok"), None)
        if bad is not None:
            out[impl] = dict(bad)
            continue
        medians = [float(r["median_ms"]) for r in runs]
        combined = dict(runs[0], round_medians_ms=medians)
        combined["median_ms"] = float(statistics.median(medians))
        combined["tasks_per_s"] = (
            runs[0]["tasks_per_s"] * runs[0]["median_ms"] / combined["median_ms"]
        )
        for key in ("peak_memory_mib", "peak_memory_increase_mib"):
            if all(r.get(key) is not None for r in runs):
                combined[key] = max(r[key] for r in runs)
        increases = [r.get("peak_memory_increase_mib") for r in runs]
        if all(m is not None for m in increases):
            combined["round_peak_increase_mib"] = increases
        steals = [r["cpu_steal_fraction"] for r in runs if r.get("cpu_steal_fraction") is not None]
        combined["cpu_steal_fraction"] = sum(steals) / len(steals) if steals else None
        out[impl] = combined
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--check`` (float64 agreement) or timing of settings; exit 1 on a mismatch."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="tiny float64 agreement check")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    p.add_argument(
        "--impls", default=",".join(DEFAULT_IMPLS), help="comma-separated, reference first"
    )
    p.add_argument("--reference", default="plain")
    p.add_argument("--orders", default="second,first", help="check mode: second,first or one")
    p.add_argument("--python-for", action="append", default=[], metavar="IMPL=PY")
    p.add_argument("--workdir", type=Path, default=_REPO / "runs" / "peers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="timing mode: stop timing an impl once its timed iterations add up to this many "
        "seconds (after at least 3); the rows say how many were timed",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds one impl's process may run (set-up, warm-up and timing) before it is "
        "stopped and reported as a timeout",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every impl this many times, in turn (each round starts one impl later), and "
        "report the median of the rounds' medians and the spread of the per-round ratios",
    )
    p.add_argument("--first-order", action="store_true", help="timing mode: FOMAML")
    backward = p.add_mutually_exclusive_group()
    backward.add_argument(
        "--batch-backward",
        action="store_true",
        help="every task-loop impl backpropagates the meta-batch's mean once (the whole batch's "
        "graph held); default: each impl's official style (per task for plain, learn2learn, "
        "higher; once for the TorchOpt impls); the rows' `backward` says which ran",
    )
    backward.add_argument(
        "--per-task-backward",
        action="store_true",
        help="every task-loop impl backpropagates each task's loss / T as soon as it exists",
    )
    p.add_argument(
        "--same-allocator",
        action="store_true",
        help="give every process (peers too) the glibc malloc settings metafunc.tune_cpu_allocator "
        "applies to its own, through MALLOC_* environment variables",
    )
    p.add_argument("--out", type=Path, default=None, help="also write summary JSON + table here")
    args = p.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.python_for)
    impls = [s for s in args.impls.split(",") if s]
    workdir: Path = args.workdir / time.strftime("%Y%m%d-%H%M%S")
    per_task = False if args.batch_backward else (True if args.per_task_backward else None)
    extra = {"threads": args.threads, "per_task_backward": per_task}
    env = None
    if args.same_allocator:
        from metafunc.cpu import MALLOC_ENV

        env = {k: str(v) for k, v in MALLOC_ENV.items()}
    summary: list[dict[str, Any]] = []
    failed = False
    for name in [s for s in args.settings.split(",") if s]:
        if args.check:
            for order in [s for s in args.orders.split(",") if s]:
                spec = setting(name, first_order=order == "first", device=args.device, **extra)
                spec = tiny(spec)
                spec = spec.replace(name=f"{spec.name}-{order}")
                results = run_all(spec, impls, workdir, args.seed, overrides, env, args.timeout)
                rows = compare_gradients(results, args.reference, rtol=1e-6)
                failed |= any(r["ok"] is False for r in rows)
                for r in rows:
                    style = results[r["impl"]].get("backward")
                    summary.append({"setting": spec.name, **r, "backward": style})
            continue
        spec = setting(
            name,
            device=args.device,
            dtype=args.dtype,
            warmup=args.warmup,
            iters=args.iters,
            max_seconds=args.max_seconds,
            first_order=args.first_order,
            **extra,
        )
        rounds = [  # each round starts one impl later
            run_all(
                spec,
                impls[k % len(impls) :] + impls[: k % len(impls)],
                workdir / f"round{k}" if args.rounds > 1 else workdir,
                args.seed,
                overrides,
                env,
                args.timeout,
            )
            for k in range(args.rounds)
        ]
        results = combine_rounds([{impl: r[impl] for impl in impls} for r in rounds])
        rtol = 1e-6 if args.dtype == "float64" else 1e-3
        agree = {r["impl"]: r for r in compare_gradients(results, args.reference, rtol=rtol)}
        plain = results.get("plain", {})
        flops, rate = plain.get("flops_per_iteration"), plain.get("matmul_flop_per_s")
        for impl, res in results.items():
            keep = ("status", "impl_version", "median_ms", "timed_iters", "tasks_per_s")
            keep += ("peak_memory_mib",)
            row = {"setting": name, "impl": impl, **{k: res.get(k) for k in keep}}
            row["backward"] = res.get("backward")
            if flops and rate and res.get("status") == "ok":  # identical work: plain's count
                achieved = flops / (res["median_ms"] / 1000.0)
                row["gflop_per_s"] = round(achieved / 1e9, 2)
                row["of_matmul"] = round(achieved / rate, 3)
            row["peak_increase_mib"] = res.get("peak_memory_increase_mib")
            steal = res.get("cpu_steal_fraction")
            row["steal"] = None if steal is None else round(steal, 3)
            row["grad_rel_err"] = agree[impl].get("grad_rel_err")
            row["grad_global_rel_err"] = agree[impl].get("grad_global_rel_err")
            row["reason"] = res.get("reason", "")
            row["allocator"] = res.get("allocator")
            if res.get("round_medians_ms"):
                row["round_medians_ms"] = [round(m, 1) for m in res["round_medians_ms"]]
            if res.get("round_peak_increase_mib"):
                row["round_peak_increase_mib"] = [round(m) for m in res["round_peak_increase_mib"]]
            summary.append(row)
    if args.check:
        cols = ["setting", "impl", "backward", "status", "loss_rel_err", "grad_rel_err"]
        cols += ["grad_global_rel_err", "worst_param", "ok"]
    else:
        cols = ["setting", "impl", "backward", "status", "median_ms", "timed_iters", "tasks_per_s"]
        cols += ["peak_memory_mib"]
        cols += ["peak_increase_mib", "gflop_per_s", "of_matmul", "grad_rel_err"]
        cols += ["grad_global_rel_err", "steal"]
    print(format_table(summary, [*cols, "reason"]))
    table = format_table(summary, [*cols, "reason"], markdown=True)
    ratios = [] if args.check else speedups(summary)
    if ratios:
        print(format_table(ratios, list(ratios[0])))
        table += "\n\n" + format_table(ratios, list(ratios[0]), markdown=True)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"summary: {workdir / 'summary.json'}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d"), "device": args.device, "dtype": args.dtype,
            "threads": args.threads, "first_order": args.first_order, "iters": args.iters,
            "warmup": args.warmup, "rounds": args.rounds, "torch": torch.__version__,
            "per_task_backward": per_task,  # None: each impl's official style (rows' `backward`)
            "allocator_env": env,  # --same-allocator's; rows' `allocator`: each process's
            "machine": machine(torch.device(args.device)),
        }  # fmt: skip
        args.out.write_text(json.dumps({**meta, "rows": summary, "speedups": ratios}, indent=2))
        where = meta["machine"]
        header = (
            f"{where['date']} on {where['cpu']} ({where['cpu_model']}, {where['cpu_count']} "
            f"CPUs{', ' + where['gpu'] if 'gpu' in where else ''}), commit {where['commit']}, "
            f"{args.threads or 'default'} threads per process, {args.rounds} round(s)"
        )
        args.out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
        print(f"results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
