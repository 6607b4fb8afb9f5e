"""``--compile``: whether a run's training step is compiled, and the caches that make a repeated
config cheap to compile (inductor's artifacts, and the whole step precompiled by dynamo)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metafunc import tree as mt
from metafunc.data.cache import default_cache_dir, write_atomic
from metafunc.harness.config import Config
from metafunc.step import CompileError, Step, compile_step

if TYPE_CHECKING:
    from metafunc.harness.run import Run

# what 'auto' assumes a first (cold) compile costs before this machine has timed one, what
# fraction of it a compile from inductor's warm cache costs, and what loading a precompiled
# step costs (seconds), see HISTORY "the precompiled step"
COMPILE_GUESS_S = 17.0
WARM_FRACTION = 0.3
LOAD_GUESS_S = 2.0
# a compile whose step is precompiled into the cache serves every later run of the config, so
# 'auto' pays for it when it costs up to this factor of the eager time it saves in this run
CACHED_CREDIT = 1.5


def _compile_times() -> Path:
    return default_cache_dir() / "compile-times.json"


def _settings(cfg: Config, **also: Any) -> dict[str, Any]:
    """The config as a compiled step sees it: without its seed, folders and compile choice
    (and whatever ``also`` sets aside)."""
    return cfg.replace(seed=0, data_root=None, preset=None, compile="off", **also).to_dict()


def _compile_key(cfg: Config) -> str:
    """What a compile's time depends on: the settings but for the run's length."""
    return json.dumps({**_settings(cfg, iterations=1), "torch": torch.__version__}, sort_keys=True)


def _recorded() -> dict[str, Any]:
    """Every config's compile times on this machine."""
    return json.loads(_compile_times().read_text()) if _compile_times().is_file() else {}


@functools.cache
def source_digest() -> str:
    """A hash of metafunc's Python source: a precompiled step is code, and goes stale with it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def step_cache(cfg: Config) -> Path:
    """The file of ``cfg``'s training step precompiled (:func:`metafunc.compile_step`'s
    ``cache``), named by everything the step's program bakes in: the config but for its seed
    and folders (the length stays: the outer schedule depends on it), torch's and Python's
    versions, and metafunc's source."""
    versions = {"torch": torch.__version__, "python": sys.version, "source": source_digest()}
    key = json.dumps({**_settings(cfg), **versions}, sort_keys=True)
    return default_cache_dir() / "steps" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"


def use_inductor_cache() -> None:
    """Keep ``torch.compile``'s artifacts (inductor's FX graph and AOT autograd caches) under
    the metafunc cache folder, so a repeated config compiles from cache (a folder the user set
    in ``TORCHINDUCTOR_CACHE_DIR`` is kept; torch's own default, a temporary folder, is not)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(torch_default()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_dir() / "inductor")


def remember_compile(cfg: Config, step: Step, compile_s: float, compiled_ms: float) -> str:
    """Record a compile of ``cfg``'s ``step`` on this machine (its seconds, and milliseconds
    per compiled step) for ``'auto'`` to expect next time; returns how it compiled:
    ``'loaded'`` (the precompiled step from :func:`step_cache`), ``'cold'`` (the first of this
    config) or ``'warm'`` (from inductor's cache)."""
    known = _recorded()
    seen = known.get(_compile_key(cfg), {})
    how = "loaded" if step.precompiled == "loaded" else "warm" if seen else "cold"
    known[_compile_key(cfg)] = {
        **seen,
        f"{how}_s": round(compile_s, 2),
        "compiled_ms": round(compiled_ms, 4),
    }
    _compile_times().parent.mkdir(parents=True, exist_ok=True)
    write_atomic(_compile_times(), (json.dumps(known, indent=1) + "\n").encode())
    return how


def expected_compile_s(cfg: Config) -> float:
    """What compiling ``cfg``'s step should cost here: loading it, when it is precompiled;
    else the last compile from inductor's cache, a fraction of a cold one, or a guess."""
    seen = _recorded().get(_compile_key(cfg), {})
    if step_cache(cfg).is_file():
        return float(seen.get("loaded_s", LOAD_GUESS_S))
    if "warm_s" in seen:
        return float(seen["warm_s"])
    if "cold_s" in seen:
        return float(seen["cold_s"]) * WARM_FRACTION
    return COMPILE_GUESS_S


def resolve_compile(
    cfg: Config, run: Run, meta: Any, opt: Any, remaining: int
) -> tuple[str, dict[str, Any], Step]:
    """``(choice, record, step)`` for ``compile='auto'``: the step (eager or compiled) that
    finishes the ``remaining`` iterations sooner on this configuration's own work.

    The eager step is timed on one meta-batch of the run's tasks (median of 3 after a warm-up).
    Unless that many eager steps take less than a compile is expected to cost
    (:func:`expected_compile_s`; a step compiled whole is precompiled into the cache, so its
    compile is allowed :data:`CACHED_CREDIT` times the time it saves), the step is compiled,
    the compile timed (with a call at the next iteration) and the compiled step timed alike;
    the compiled one is kept when it is faster (its compile is paid by then). The record
    (milliseconds per step, compile seconds, the choice and why) goes to the run folder's
    ``compile.json``; the compiled step is returned for the run to use."""
    why = cfg.compile_unavailable()
    eager = compile_step(run.algorithm, opt, mode=None)
    if why:
        return "off", {"choice": "off", "why": why}, eager
    gen = torch.Generator(device=getattr(run.train_tasks, "device", None) or "cpu")
    batch = run.train_tasks.sample(cfg.meta_batch, gen.manual_seed(cfg.seed + 2))
    state = eager.init(meta)

    def ms_per_step(step: Step) -> float:
        times = []
        for i in range(3):
            start = time.perf_counter()
            _, metrics = step(state, batch, iteration=i)
            float(metrics["loss"])  # waits for the device
            times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[1]

    ms_per_step(eager)  # warm-up
    eager_ms = ms_per_step(eager)
    record: dict[str, Any] = {"eager_ms": round(eager_ms, 4), "remaining": remaining}
    expected = expected_compile_s(cfg)
    whole = run.algorithm.tasks_per_graph(batch, mt.device_of(meta)) >= batch.num_tasks
    credit = CACHED_CREDIT if whole else 1.0
    saving_ms = eager_ms - _recorded().get(_compile_key(cfg), {}).get("compiled_ms", 0.0)
    if credit * remaining * saving_ms / 1e3 <= expected:
        record.update(choice="off", expected_compile_s=round(expected, 1), why=(
            f"compiling (about {expected:.1f} s) would not pay back over {remaining} steps of "
            f"{eager_ms:.3f} ms; --compile default compiles anyway, and fills the cache that "
            "makes the next compile of this config quicker"))  # fmt: skip
        return "off", record, eager
    compiled = compile_step(run.algorithm, opt, mode="default", cache=step_cache(cfg))
    start = time.perf_counter()
    try:
        for i in (0, 1):  # the first call compiles (or loads); the next covers a new iteration
            float(compiled(state, batch, iteration=i)[1]["loss"])
    except CompileError as error:  # eager, and the reason on record
        record.update(choice="off", why=f"the step does not compile: {error}")
        return "off", record, eager
    compile_s = time.perf_counter() - start
    compiled_ms = ms_per_step(compiled)
    how = remember_compile(cfg, compiled, compile_s, compiled_ms)
    faster = compiled_ms < eager_ms
    record.update(
        compiled_ms=round(compiled_ms, 4), compile_s=round(compile_s, 2),
        cache=how, precompiled=compiled.precompiled,
        choice="default" if faster else "off",
        why=f"compiled {compiled_ms:.3f} ms against eager {eager_ms:.3f} ms per step",
    )  # fmt: skip
    return record["choice"], record, compiled if faster else eager
