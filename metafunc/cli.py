"""The ``metafunc`` command: ``train``, ``eval``, ``plot``, ``bench`` (and ``python -m metafunc``).

User errors (bad flags, configs, paths, checkpoints) print one clear line and exit with status 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config key, in groups, each with its help, default and choices."""
    from metafunc.harness.config import CHOICES, FLAGS, GROUPS, ONLY_FOR, Config

    groups = {name: p.add_argument_group(f"{name} options") for name in GROUPS}
    for f in fields(Config):
        if f.name == "preset":
            continue
        group, text = FLAGS[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = "(default: " + ("none" if f.default is None else str(f.default)) + ")"
        if isinstance(f.default, tuple):
            default = f"(default: {' '.join(map(str, f.default))})"
        owners = f" [{', '.join(ONLY_FOR[f.name])}]" if f.name in ONLY_FOR else ""
        suffix = "" if "default" in text else f" {default}"  # the text says it already
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": f"{text}{owners}{suffix}"}  # fmt: skip
        hint = str(f.type)
        if "bool" in hint:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "tuple" in hint:
            kwargs.update(type=int, nargs="+", metavar="N")
        elif "int" in hint:
            kwargs.update(type=int, metavar="N")
        elif "float" in hint:
            kwargs.update(type=float, metavar="X")
        else:
            kwargs.update(type=str, choices=CHOICES.get(f.name), metavar=None)
            if f.name not in CHOICES:
                kwargs["metavar"] = "PATH" if f.name in ("data_root", "weights") else "S"
        groups[group].add_argument(flag, **kwargs)


def _parser() -> argparse.ArgumentParser:
    from metafunc.harness.config import DATASETS, PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="metafunc",
        description="Functional meta-learning for PyTorch: train, evaluate and benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train (default: a quick MAML sinusoid run), then evaluate",
        description="Train a meta-learner. With no flags: MAML on the sinusoid task with the "
        "paper's network and settings, shortened to run in about a minute on 2 CPU cores.",
    )
    train.add_argument("--config", help="a JSON/TOML/YAML file of config keys")
    train.add_argument(
        "--preset", help="a named preset with a paper's settings (see --list-presets)"
    )
    train.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    train.add_argument(
        "--run-dir", help="output folder (default runs/<algorithm>-<dataset>-<time>)"
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    ev = sub.add_parser(
        "eval",
        help="evaluate a run on the fixed test episodes",
        description="Score a run's best-on-validation checkpoint (--keep-best runs) or its "
        "latest on fixed, seeded test episodes; writes eval.json (or eval-<dataset>.json).",
    )
    ev.add_argument("run_dir")
    ev.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="test episodes (default: the run's eval_episodes)",
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the test episodes (default: the one every evaluation of a run uses)",
    )
    ev.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=None,
        help="Omniglot: random episodes or Lake et al.'s within-alphabet runs (default: the run's)",
    )
    ev.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="cross-domain: score another benchmark's test classes (same image size, channels)",
    )
    ev.add_argument("--data-root", default=None, help="the folder holding --dataset's data")
    plot = sub.add_parser(
        "plot",
        help="PNG learning curves (and the MAML sinusoid figure) of a run",
        description="Learning curves from metrics.jsonl; for a sinusoid run also the MAML-paper "
        "figure: true function, support points, predictions before and after adaptation.",
    )
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")
    plot.add_argument("--seed", type=int, default=0, help="seed of the plotted sinusoid tasks")
    bench = sub.add_parser(
        "bench",
        help="run a speed/memory benchmark from the source checkout's benchmarks/ folder",
        description="Runs benchmarks/<script> with the remaining arguments: peers (metafunc vs "
        "learn2learn, higher, TorchOpt, plain loops; --check for gradient agreement), memory "
        "(peak memory vs inner steps), sampler (episode sampling), strategies (metafunc's "
        "task-parallel variants against a plain loop, in one process), reproduce (paper presets).",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (--help)")
    return parser


def _config_from(args: argparse.Namespace) -> Any:
    from metafunc.harness.config import PRESETS, Config, ConfigError, load_config_file

    values: dict[str, Any] = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(
                f"--preset {args.preset}: unknown preset; choose one of {', '.join(PRESETS)}."
            )
        values.update(PRESETS[args.preset], preset=args.preset)
    if args.config:
        values.update(load_config_file(args.config))
    names = {f.name for f in fields(Config)} - {"preset"}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return Config.from_dict(values)


# Algorithms whose outer schedule depends on the total number of iterations (Reptile's linear
# annealing, MAML++'s cosine): a longer run is a different run from its first step.
_SCHEDULED = ("reptile", "mamlpp")


def _extend(run_dir: Path, iterations: int) -> None:
    """``--resume RUN --iterations N``: continue a run to ``N`` iterations; exactly the run that
    ``--iterations N`` would have been from the start when the outer schedule does not depend on
    the total (every algorithm but Reptile with annealing and MAML++)."""
    from metafunc.harness import Config, ConfigError

    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json in that folder.")
    cfg = Config.from_dict(json.loads(path.read_text()), source=str(path))
    if iterations < cfg.iterations:
        raise ConfigError(
            f"--resume {run_dir} --iterations {iterations}: the run is set to {cfg.iterations} "
            "iterations; --iterations can only extend it."
        )
    if (
        iterations != cfg.iterations
        and cfg.algorithm in _SCHEDULED
        and (cfg.algorithm != "reptile" or cfg.anneal)
    ):
        raise ConfigError(
            f"--resume {run_dir} --iterations {iterations}: {cfg.algorithm}'s outer schedule "
            "depends on the total number of iterations, so a longer run is a new run; start "
            "one with --iterations."
        )
    path.write_text(json.dumps(cfg.replace(iterations=iterations).to_dict(), indent=2) + "\n")


def _train(args: argparse.Namespace) -> int:
    from metafunc.harness import PRESETS, train

    if args.list_presets:
        _print_presets(PRESETS)
        return 0
    if args.resume:
        if args.iterations is not None:
            _extend(Path(args.resume), args.iterations)
        return 0 if train(None, args.resume, resume=True, quiet=args.quiet) else 1  # type: ignore[arg-type]
    cfg = _config_from(args)
    run_dir = Path(
        args.run_dir or f"runs/{cfg.algorithm}-{cfg.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    if not args.quiet:
        print(f"run folder: {run_dir}")
    train(cfg, run_dir, quiet=args.quiet)
    return 0


def _print_presets(presets: dict[str, dict[str, Any]]) -> None:
    """A table of the presets: name, paper, setting, the paper's iterations."""
    from metafunc.harness.config import PRESET_PAPERS

    rows = [("preset", "paper", "setting", "iterations")]
    for name, values in presets.items():
        paper = PRESET_PAPERS.get(name, "")
        dataset = values.get("dataset", "sinusoid")
        shape = (
            ""
            if dataset == "sinusoid"
            else f" {values.get('ways', 5)}-way "
            + (f"{values.get('eval_shots') or values.get('shots', 10)}-shot")
        )
        setting = f"{values.get('algorithm', 'maml')} {dataset}{shape}"
        if values.get("protocol", "random") != "random":
            setting += f", {values['protocol']} runs"
        rows.append((name, paper, setting, f"{values.get('iterations', 5000):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("\nmetafunc train --preset NAME [--iterations N ...]: flags override a preset's keys.")


def _eval(args: argparse.Namespace) -> int:
    from metafunc.harness.run import evaluate, format_results, load_run

    changes = {k: v for k, v in (("protocol", args.protocol), ("dataset", args.dataset),
                                 ("data_root", args.data_root)) if v is not None}  # fmt: skip
    run, meta, checkpoint = load_run(args.run_dir, **changes)
    seed = {} if args.seed is None else {"seed": args.seed}  # default: evaluate's TEST_SEED
    results = evaluate(run, meta, episodes=args.episodes, **seed)
    results["checkpoint"] = checkpoint
    name = f"eval-{args.dataset}.json" if args.dataset else "eval.json"
    if args.protocol:
        name = name.replace(".json", f"-{args.protocol}.json")
    (Path(args.run_dir) / name).write_text(json.dumps(results, indent=2) + "\n")
    print(format_results(results, run.config.is_regression))
    return 0


BENCHMARKS = {
    "peers": "peers/driver.py",
    "precision": "bench_precision.py",
    "memory": "bench_memory.py",
    "sampler": "bench_sampler.py",
    "strategies": "bench_strategies.py",
    "reproduce": "reproduce.py",
}


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    from metafunc.harness import ConfigError

    candidates = [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    folder = next((c for c in candidates if (c / BENCHMARKS[args.name]).is_file()), None)
    if folder is None:
        raise ConfigError(
            "bench: the benchmark scripts live in the source checkout's benchmarks/ folder, "
            "which this installation does not have; clone the repository and pip install -e ., "
            "or run from the checkout."
        )
    cmd = [sys.executable, str(folder / BENCHMARKS[args.name]), *args.args]
    return subprocess.run(cmd, check=False).returncode


def _plot(args: argparse.Namespace) -> int:
    from metafunc.harness.plot import plot_run

    for path in plot_run(args.run_dir, out_dir=args.out, seed=args.seed):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from metafunc.harness import NumericsError

    args = _parser().parse_args(argv)
    try:
        if args.command in ("train", "eval"):
            from metafunc.cpu import tune_cpu_allocator

            tune_cpu_allocator()  # process-wide, before any thread starts; see metafunc.cpu
        if args.command == "train":
            return _train(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "bench":
            return _bench(args)
        return _eval(args)
    except NumericsError as err:
        print(f"metafunc {args.command}: error: {err}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError) as err:
        # ConfigError, CheckpointError and the data loaders' errors: user errors, no traceback
        print(f"metafunc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metafunc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
