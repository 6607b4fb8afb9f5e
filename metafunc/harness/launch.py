"""How a training run starts: which config and checkpoint it continues from, and, under
``torchrun``, the agreement between ranks (same flags everywhere, rank 0's reading of the run
folder, each rank's share of the global batch) and the debugging hooks read from the environment.

Only rank 0 reads or writes the run folder, so the other ranks (other nodes) need no shared file
system: what they must know of it (the config, the starting state) reaches them by broadcast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from metafunc import distributed as mdist
from metafunc.harness.checkpoint import latest_checkpoint
from metafunc.harness.config import Config, ConfigError

__all__ = [
    "Start", "agree", "batch_key", "debug_sync_every", "injected_crash_step", "open_run", "share",
    "trim_log",
]  # fmt: skip

Start = tuple[Config, Path | None, int | None]
"""``(config, checkpoint to start from or None, debug sync interval or None)``."""


def open_run(cfg: Config | None, run_dir: Path, *, resume: bool, auto: bool) -> Start:
    """The config to train and the checkpoint to start from (``None``: from scratch).

    ``resume``: the folder's saved config and latest checkpoint. ``auto`` (under torchrun): a
    folder holding checkpoints of this same config is resumed, which is how a worker group that
    ``torchrun --max-restarts`` restarts continues, and one holding another config's is refused.
    """
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(
                f"--resume {run_dir}: no checkpoint (ckpt-*.safetensors) in that folder."
            )
        saved = json.loads((run_dir / "config.json").read_text())
        return Config.from_dict(saved, source=f"{run_dir}/config.json"), ckpt, None
    assert cfg is not None
    path = run_dir / "config.json"
    ckpt = latest_checkpoint(run_dir) if auto else None
    if ckpt is None or not path.is_file():
        return cfg, None, None
    saved = Config.from_dict(json.loads(path.read_text()), source=str(path))
    mine, theirs = cfg.to_dict(), saved.to_dict()
    resolved = ("strategy", "chunk_size") if mine["strategy"] == "auto" else ()  # what 'auto' chose
    differ = [k for k in mine if mine[k] != theirs[k] and k not in resolved]
    if differ:
        raise ConfigError(
            f"train: {run_dir} holds checkpoints of another configuration (it differs in "
            f"{', '.join(differ)}). Under torchrun a run folder with this config's checkpoints "
            f"is resumed; pick a new --run-dir, or continue that run with --resume {run_dir}."
        )
    return saved, ckpt, None


def agree(cfg: Config | None, run_dir: Path, *, resume: bool) -> Start:
    """:func:`open_run` for every rank of the process group.

    Checks first that every rank was given the same config and ``--resume`` (comparing hashes;
    the error names the ranks and keys that differ), then rank 0 reads the run folder (and
    ``METAFUNC_DEBUG_SYNC``) and broadcasts its decision; only rank 0 gets the checkpoint path.
    """
    flags = {**(cfg.to_dict() if cfg is not None else {}), "resume": resume}
    mdist.assert_same(flags, what="train: the configuration")
    rank = mdist.rank()
    plan: tuple[dict | None, str | None, int | None, str | None] = (None, None, None, None)
    error: Exception | None = None
    if rank == 0:
        try:
            chosen, ckpt, _ = open_run(cfg, run_dir, resume=resume, auto=True)
            plan = (chosen.to_dict(), None if ckpt is None else str(ckpt), debug_sync_every(), None)
        except (ValueError, OSError) as err:  # every rank must raise, not only rank 0
            error = err
            plan = (None, None, None, str(err))
    plan = mdist.broadcast_object(plan)
    if error is not None:
        raise error
    if plan[3] is not None:
        raise ConfigError(plan[3])
    assert plan[0] is not None
    ckpt = Path(plan[1]) if rank == 0 and plan[1] is not None else None
    return Config.from_dict(plan[0]), ckpt, plan[2]


def batch_key(cfg: Config) -> str:
    """The config key that sizes one iteration's batch: ``'batch_size'`` for the classification
    baseline's pretraining, ``'meta_batch'`` for everything else."""
    return "batch_size" if cfg.algorithm == "baseline" and not cfg.is_regression else "meta_batch"


def share(cfg: Config, rank: int, world: int) -> tuple[int, int]:
    """``(first, count)``: the tasks (or pretraining images) of each global batch that ``rank``
    of ``world`` takes, by :func:`metafunc.distributed.split_sizes`."""
    key = batch_key(cfg)
    total = getattr(cfg, key)
    if total < world:
        what = "image of each pretraining batch" if key == "batch_size" else "task to adapt"
        raise ConfigError(
            f"train: {key}={total} is smaller than the world size ({world}): every rank needs "
            f"at least one {what}. Use --{key.replace('_', '-')} {world} or more, or launch fewer "
            "processes (torchrun --nproc-per-node, --nnodes)."
        )
    sizes = mdist.split_sizes(total, world)
    return sum(sizes[:rank]), sizes[rank]


def debug_sync_every() -> int | None:
    """``METAFUNC_DEBUG_SYNC=N``: check every ``N`` steps (and after the last) that all ranks hold
    bit-identical meta-parameters and optimizer state; unset or ``0``: never."""
    value = os.environ.get("METAFUNC_DEBUG_SYNC", "").strip() or "0"
    if not value.isdigit():
        raise ConfigError(
            f"METAFUNC_DEBUG_SYNC={value!r}: set it to N >= 1 to compare the ranks' parameters "
            "every N steps, or to 0 (off)."
        )
    return int(value) or None


def injected_crash_step(rank: int) -> int | None:
    """Fault-injection hook for tests: ``METAFUNC_TEST_CRASH=RANK:STEP`` makes rank ``RANK`` kill
    itself (SIGKILL, as a lost machine would) before step ``STEP`` of the worker group's first
    attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a restart is tested."""
    value = os.environ.get("METAFUNC_TEST_CRASH")
    if not value or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    who, _, step = value.partition(":")
    if not (who.isdigit() and step.isdigit()):
        raise ConfigError(f"METAFUNC_TEST_CRASH={value!r}: use RANK:STEP, e.g. 1:3.")
    return int(step) if int(who) == rank else None


def trim_log(path: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` records past ``step`` (and a line cut short by a kill): a run
    resumed from step ``step`` logs them again, and the log then reads as one run's."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        path.write_text("".join(keep))
