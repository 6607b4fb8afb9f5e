"""Training and evaluation runs: what one step computes is the algorithm's ``meta_grad``; this
module runs it, logs, checkpoints, resumes exactly and evaluates on a fixed set of episodes.

Under ``torchrun`` the same :func:`train` runs data-parallel (see :mod:`metafunc.distributed` for
the design): every rank draws the whole global meta-batch from the one seeded generator and
adapts its own slice, meta-gradients are averaged over the ranks weighted by their task counts,
and rank 0 alone writes the run folder; a restarted worker group resumes from its checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metafunc import algorithms, models, optim
from metafunc import distributed as mdist
from metafunc import tree as mt
from metafunc.data import TaskBatch, get_benchmark
from metafunc.harness import launch
from metafunc.harness.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from metafunc.harness.config import Config, ConfigError
from metafunc.strategies import default_strategy, strategy_label

__all__ = [
    "NumericsError", "Run", "build", "build_algorithm", "evaluate", "init_meta", "train",
    "train_step",
]  # fmt: skip


class NumericsError(RuntimeError):
    """A NaN or infinite loss or gradient."""


@dataclass
class Run:
    """The pieces of an experiment built from a :class:`Config`."""

    config: Config
    algorithm: algorithms.Algorithm
    eval_algorithm: algorithms.Algorithm
    train_tasks: Any
    test_tasks: Any
    device: torch.device
    dtype: torch.dtype
    meta_grad: Any = None  # algorithm.meta_grad, or its compiled form with config.compile

    def __post_init__(self) -> None:
        if self.meta_grad is None:
            alg = self.algorithm
            mode = self.config.compile
            grad = alg.meta_grad if mode is None else alg.compiled_meta_grad(mode)

            def meta_grad(meta: Any, batch: TaskBatch, *, iteration: int = 0) -> Any:
                with self.precision():
                    return grad(meta, batch, iteration=iteration)

            self.meta_grad = meta_grad

    def precision(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of ``config.precision`` (``'bf16'``), else a null context;
        :func:`build` sets the TF32 flags of the other choices."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _device(cfg: Config) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"config: device={cfg.device!r} but CUDA is not available on this machine; use "
            "--device cpu."
        )
    if cfg.device == "cuda" and mdist.is_initialized():  # one GPU per rank on each node
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(cfg.device)


def build_model(cfg: Config, ways: int | None) -> models.Model:
    """The network of ``cfg``; ``ways=None`` gives it no head (an embedding)."""
    kind = cfg.model
    if kind == "auto":
        kind = {
            "sinusoid": "mlp",
            "mini-imagenet": "conv4-maxpool",
            "cifar-fs": "conv4-maxpool",
        }.get(cfg.dataset, "conv4")
    if kind == "mlp":
        if not cfg.is_regression:
            raise ConfigError(f"config: model='mlp' is for the sinusoid, not {cfg.dataset}.")
        if cfg.channels_last is not None:
            raise ConfigError(
                "config: channels_last is for the convolutional models (conv4, resnet12); "
                "model='mlp' has no convolutions: drop it."
            )
        h = cfg.hidden or 40
        return models.mlp((1, h, h, 1))
    if cfg.is_regression:
        raise ConfigError(f"config: model={kind!r} takes images; use model='mlp' (or auto).")
    if kind == "conv4":
        return models.conv4(
            ways,
            hidden=cfg.hidden or 64,
            in_channels=1 if "omniglot" in cfg.dataset else 3,
            channels_last=cfg.channels_last,
        )
    if kind == "conv4-maxpool":
        size = 84 if cfg.dataset == "mini-imagenet" else 32
        return models.conv4(
            ways,
            hidden=cfg.hidden or 32,
            in_channels=3,
            pooling="maxpool",
            image_size=size,
            channels_last=cfg.channels_last,
        )
    return models.resnet12(ways, channels_last=cfg.channels_last)


_GRADIENT_BASED = {
    "maml": algorithms.MAML,
    "fomaml": algorithms.FirstOrderMAML,
    "anil": algorithms.ANIL,
    "metasgd": algorithms.MetaSGD,
    "mamlpp": algorithms.MAMLPlusPlus,
}


def build_algorithm(cfg: Config, train_tasks: Any, strategy: str) -> algorithms.Algorithm:
    """The algorithm of ``cfg`` (``train_tasks`` gives the baseline its class count)."""
    ways = None if cfg.is_regression else (cfg.ways or 5)
    loss = "mse" if cfg.is_regression else "cross_entropy"
    common: dict[str, Any] = {"strategy": strategy, "chunk_size": cfg.chunk_size}
    inner: dict[str, Any] = {"inner_lr": cfg.inner_lr, "inner_steps": cfg.inner_steps}
    if cfg.inner_optimizer is not None:
        inner["inner_optimizer"] = cfg.inner_optimizer
    name = cfg.algorithm
    if name in _GRADIENT_BASED:
        if name != "fomaml":
            common["first_order"] = cfg.first_order
        if cfg.inner_checkpoint:
            common["checkpoint"] = True
        return _GRADIENT_BASED[name](build_model(cfg, ways), **inner, loss=loss, **common)
    if name == "reptile":
        return algorithms.Reptile(
            build_model(cfg, ways), **inner, anneal=cfg.anneal, loss=loss, **common
        )
    if name == "imaml":
        return algorithms.IMAML(
            build_model(cfg, ways), lam=cfg.lam, cg_steps=cfg.cg_steps, **inner, loss=loss,
            **common,
        )  # fmt: skip
    if name == "protonet":
        return algorithms.ProtoNet(build_model(cfg, None), shots=cfg.shots, **common)
    # the pretrain-then-fine-tune baseline
    extra: dict[str, Any] = {"finetune": cfg.finetune}
    if cfg.is_regression:
        return algorithms.Baseline(build_model(cfg, None), loss=loss, **inner, **extra, **common)
    model = build_model(cfg, None)
    x, _ = train_tasks.batch(1, torch.Generator(device=train_tasks.device).manual_seed(0))
    probe = model.init(torch.Generator().manual_seed(0), dtype=x.dtype, device=x.device)
    features = model.apply(probe, x).shape[-1]
    return algorithms.Baseline(
        model, num_train_classes=train_tasks.num_classes, feature_dim=features, ways=ways,
        loss=loss, **inner, **extra, **common,
    )  # fmt: skip


def build(cfg: Config) -> Run:
    """Model, algorithm and task samplers for ``cfg``."""
    device = _device(cfg)
    dtype = getattr(torch, cfg.dtype)
    root = cfg.data_root
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"config: data_root={root!r} does not exist.")
    common: dict[str, Any] = {"device": device, "dtype": dtype}
    options: dict[str, Any] = {}
    if cfg.dataset.startswith("omniglot") and cfg.rotate_test:
        options["eval_rotations"] = (0, 90, 180, 270)
    ways = None if cfg.is_regression else (cfg.ways or 5)
    train_kw = dict(common) if ways is None else {**common, "ways": cfg.train_ways or ways}
    test_kw = dict(common) if ways is None else {**common, "ways": ways}
    train = get_benchmark(
        cfg.dataset, root, shots=cfg.shots, queries=cfg.queries, **train_kw, **options
    ).train
    test = get_benchmark(
        cfg.dataset,
        root,
        shots=cfg.eval_shots or cfg.shots,
        queries=cfg.eval_queries or cfg.queries,
        **test_kw,
        **options,
    ).test
    if cfg.precision in ("ieee", "tf32"):
        torch.backends.cuda.matmul.fp32_precision = cfg.precision
        torch.backends.cudnn.conv.fp32_precision = cfg.precision  # type: ignore[attr-defined]
    alg = build_algorithm(cfg, train, cfg.strategy)
    eval_alg = alg
    if isinstance(alg, algorithms.ProtoNet):  # the test shots may differ from the training shots
        eval_alg = dataclasses.replace(alg, shots=cfg.eval_shots or cfg.shots)
    return Run(cfg, alg, eval_alg, train, test, device, dtype)


def pretrains(run: Run) -> bool:
    """Whether ``run`` trains on plain classification batches (the classification baseline)."""
    return isinstance(run.algorithm, algorithms.Baseline) and not run.config.is_regression


def train_step(
    run: Run, meta: Any, generator: torch.Generator, step: int, *, rank: int = 0, world: int = 1
) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor], TaskBatch | None]:
    """Draw one meta-batch (or pretraining batch) with ``generator`` and return ``(grads, loss,
    metrics, batch)``: what the outer optimizer applies at iteration ``step``.

    With ``world > 1`` the whole global batch is drawn, so ``generator`` advances as in one
    process, and only rank ``rank``'s slice (:func:`metafunc.distributed.local_slice`) is used:
    ``grads`` are then the mean over that slice, and ``batch`` is the slice."""
    cfg, alg = run.config, run.algorithm
    if pretrains(run):
        assert isinstance(alg, algorithms.Baseline)
        x, y = run.train_tasks.batch(cfg.batch_size, generator)
        if world > 1:
            x, y = mdist.split_batch((x, y), rank, world)
        with run.precision():
            grads, loss, metrics = alg.pretrain_grad(meta, x, y)
        return grads, loss, metrics, None
    batch = run.train_tasks.sample(cfg.meta_batch, generator)
    if world > 1:
        batch = mdist.split_batch(batch, rank, world)
    grads, loss, metrics = run.meta_grad(meta, batch, iteration=step)
    return grads, loss, metrics, batch


def init_meta(run: Run, seed: int) -> Any:
    """The algorithm's meta-parameters from ``seed`` (the baseline loads ``weights`` if set)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(run.algorithm, algorithms.Baseline) and run.config.weights:
        return run.algorithm.init(
            gen, dtype=run.dtype, device=run.device, weights=run.config.weights
        )
    return run.algorithm.init(gen, dtype=run.dtype, device=run.device)


def _check_finite(
    step: int,
    loss: torch.Tensor,
    grads: Any,
    run: Run,
    meta: Any,
    batch: TaskBatch | None,
    *,
    first_task: int = 0,
    world: int = 1,
) -> None:
    """Raise :class:`NumericsError` for a non-finite loss or gradient. Under ``torch.distributed``
    ``loss`` and ``grads`` are the all-reduced ones (so every rank raises together), ``batch`` is
    this rank's slice starting at task ``first_task`` of the global meta-batch."""
    bad = [p for p, g in mt.flatten_with_paths(grads).items() if not torch.isfinite(g).all()]
    if torch.isfinite(loss) and not bad:
        return
    found: int | None = None
    tasks = [] if batch is None else range(batch.num_tasks)
    for t in tasks:  # error path only: find the first task that diverges
        assert batch is not None
        one = TaskBatch(*(f[t : t + 1] for f in batch))
        task_loss, _ = run.algorithm.meta_loss(meta, one, iteration=step)
        if not torch.isfinite(task_loss):
            found = first_task + t
            break
    if world > 1:  # every rank is here: agree on the first diverging task of the global batch
        found = min((t for t in mdist.all_gather_object(found) if t is not None), default=None)
    task = "?" if found is None else str(found)
    raise NumericsError(
        f"train: step {step}: the meta-loss is {float(loss)} and the gradient is not finite at "
        f"{bad[:3] or 'no leaf'}; first diverging task in the meta-batch: {task}. The last good "
        "checkpoint is kept; lower --outer-lr or --inner-lr and resume or restart."
    )


def evaluate(
    run: Run, meta: Any, *, episodes: int | None = None, seed: int = 1234
) -> dict[str, Any]:
    """The standard protocol: a fixed, seeded set of test episodes; mean ± 95% interval of the
    query loss (and accuracy) after each of ``report_steps`` inner steps.

    Under ``torch.distributed`` every rank must call it: the batches of episodes are dealt to the
    ranks in turn and their per-episode metrics all-gathered, so every rank returns the same
    results as one process would."""
    cfg = run.config
    count = episodes or cfg.eval_episodes
    rank, world = mdist.rank(), mdist.world_size()
    mine: list[tuple[int, dict[str, torch.Tensor]]] = []
    for i, batch in enumerate(run.test_tasks.episodes(count, seed, batch_size=cfg.eval_batch)):
        if i % world == rank:
            with run.precision():
                metrics = run.eval_algorithm.evaluate(meta, batch, cfg.eval_inner_steps)
            mine.append((i, {k: v.double().cpu() for k, v in metrics.items()}))
    if world > 1:
        mine = sorted(
            (b for part in mdist.all_gather_object(mine) for b in part), key=lambda b: b[0]
        )
    per_step: dict[str, list[torch.Tensor]] = {}
    for _, metrics in mine:
        for k, v in metrics.items():
            per_step.setdefault(k, []).append(v)
    results: dict[str, Any] = {"episodes": count, "seed": seed, "steps": list(cfg.report_steps)}
    for k, chunks in per_step.items():
        values = torch.cat(chunks)  # [episodes, steps + 1]
        mean = values.mean(0)
        ci = 1.96 * values.std(0) / math.sqrt(values.shape[0])
        results[k] = {
            str(s): {"mean": float(mean[s]), "ci95": float(ci[s])} for s in cfg.report_steps
        }
    return results


def _format_results(results: dict[str, Any], regression: bool) -> str:
    key = "loss" if regression else "accuracy"
    name = "MSE" if regression else "accuracy"
    scale = 1.0 if regression else 100.0
    lines = []
    for s, v in results[key].items():
        lines.append(
            f"  {name} after {s:>2} steps: {scale * v['mean']:.3f} ± {scale * v['ci95']:.3f}"
        )
    return f"test ({results['episodes']} episodes, 95% interval):\n" + "\n".join(lines)


def _format_timings(timings: dict[str, float | str]) -> str:
    return ", ".join(
        f"{k} {v:.3g} s" if isinstance(v, float) else f"{k} ({v})" for k, v in timings.items()
    )


def resolve_strategy(cfg: Config) -> tuple[Config, dict[str, float | str]]:
    """``cfg`` with ``strategy='auto'`` replaced by the strategy that
    :func:`metafunc.algorithms.tune_strategy` finds fastest on this very configuration (its
    model, algorithm, compile and precision settings, on one meta-batch of its own tasks, at
    the last iteration, where an annealing algorithm is at its most expensive), and
    ``{candidate: seconds per step}`` (``'out of memory'`` for a candidate that did not fit: it
    is skipped). A fixed strategy is returned as it is, with no timings; so is a pretraining run
    (the classification baseline maps tasks only to evaluate), which takes the device rule
    (:func:`metafunc.default_strategy`)."""
    if cfg.strategy != "auto":
        return cfg, {}
    if launch.batch_key(cfg) == "batch_size":  # pretraining: no meta-batch to time
        return cfg.replace(strategy=default_strategy(_device(cfg))), {}
    run = build(cfg)
    meta = init_meta(run, 0)
    gen = torch.Generator(device=getattr(run.train_tasks, "device", None) or "cpu")
    batch = run.train_tasks.sample(cfg.meta_batch, gen.manual_seed(cfg.seed + 2))
    last = max(cfg.iterations - 1, 0)
    made: dict[int, tuple[algorithms.Algorithm, Any]] = {}

    def step(alg: algorithms.Algorithm, meta: Any, batch: TaskBatch) -> Any:
        # the run's own meta-gradient (compiled, under autocast, as configured) for this
        # candidate, built once per candidate (the candidates are timed in turn)
        if id(alg) not in made:
            candidate = dataclasses.replace(run, algorithm=alg, eval_algorithm=alg, meta_grad=None)
            made[id(alg)] = (alg, candidate.meta_grad)
        return made[id(alg)][1](meta, batch, iteration=last)

    try:
        fastest, times = algorithms.tune_strategy(run.algorithm, meta, batch, step=step)
    except torch.OutOfMemoryError as error:
        tried = _format_timings(getattr(error, "timings", {}))
        raise ConfigError(
            f"train: strategy='auto' found no strategy that fits in memory ({tried}); lower "
            "--meta-batch, or pass --strategy chunked with a small --chunk-size."
        ) from None
    return cfg.replace(strategy=fastest.strategy, chunk_size=fastest.chunk_size), times


def train(
    cfg: Config, run_dir: str | Path, *, resume: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Train, checkpoint and evaluate; returns the evaluation results (also in ``eval.json``).

    Launched by ``torchrun`` (``WORLD_SIZE`` set), it joins the process group and trains
    data-parallel: every rank must be given the same config (checked by hash at start-up), each
    adapts its share of the global meta-batch ``cfg.meta_batch`` (at least one task), the
    meta-gradients are averaged weighted by task counts, and only rank 0 writes the run folder and
    prints. A run folder that already holds checkpoints of this config is resumed, so a worker
    group restarted by ``torchrun --max-restarts`` continues from its last checkpoint.
    ``METAFUNC_DEBUG_SYNC=N`` checks every ``N`` steps that all ranks hold bit-identical
    meta-parameters and optimizer state.
    """
    ctx = mdist.init_from_env()
    owns = ctx is not None and ctx.owns_group
    try:
        result = _train(cfg, Path(run_dir), resume=resume, quiet=quiet, ctx=ctx)
        if owns:  # tear down together: a rank that leaves first can abort its peer's gloo
            torch.distributed.barrier()
        return result
    finally:  # also on errors: a process group left alive can abort the interpreter at exit
        if owns:
            import gc

            torch.distributed.destroy_process_group()
            gc.collect()  # the group's worker threads end now, not in interpreter finalisation


def _train(
    cfg: Config | None, run_dir: Path, *, resume: bool, quiet: bool, ctx: mdist.Context | None
) -> dict[str, Any]:
    from tqdm import tqdm

    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    lead = rank == 0
    if ctx is None:
        cfg, ckpt, sync_every = launch.open_run(cfg, run_dir, resume=resume, auto=False)
    else:
        cfg, ckpt, sync_every = launch.agree(cfg, run_dir, resume=resume)
    set_threads(cfg)
    first, count = launch.share(cfg, rank, world)
    timings: dict[str, float | str] = {}
    if cfg.strategy == "auto":  # timed on this rank's share; saved, so a resume uses the same
        fastest, timings = resolve_strategy(cfg.replace(**{launch.batch_key(cfg): count}))
        chosen = mdist.broadcast_object((fastest.strategy, fastest.chunk_size))
        cfg = cfg.replace(strategy=chosen[0], chunk_size=chosen[1])
    run = build(cfg)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if timings:  # what 'auto' measured (seconds per step), beside the choice in config.json
            (run_dir / "strategy.json").write_text(json.dumps(timings, indent=2) + "\n")
            if not quiet:
                size = cfg.chunk_size if cfg.strategy == "chunked" else None
                print(f"strategy 'auto': {strategy_label(cfg.strategy, size)}, the fastest of "
                      f"{_format_timings(timings)} per step")  # fmt: skip
    alg = run.algorithm
    meta = init_meta(run, cfg.seed)
    opt = alg.outer_optimizer(cfg.outer_lr, cfg.iterations)
    schedule = alg.outer_schedule(cfg.outer_lr, cfg.iterations)
    opt_state = opt.init(meta)
    data_gen = torch.Generator(device=getattr(run.train_tasks, "device", None) or "cpu")
    data_gen.manual_seed(cfg.seed + 1)
    start = 0
    if ckpt is not None:
        start, trees, _ = load_checkpoint(
            ckpt, {"meta": meta, "opt": opt_state, "rng": {"data": data_gen.get_state()}}
        )
        meta, opt_state = trees["meta"], trees["opt"]
        data_gen.set_state(trees["rng"]["data"])
        launch.trim_log(run_dir / "metrics.jsonl", start)
        if ctx is not None and not quiet:
            print(f"resuming {run_dir} from {ckpt.name} (step {start})")
    if world > 1:  # rank 0's state on every rank: a fresh start, or the checkpoint it alone read
        state = {"step": torch.tensor(start), "meta": meta, "opt": opt_state}
        state = mdist.broadcast_tree({**state, "rng": data_gen.get_state()})
        start, meta, opt_state = int(state["step"]), state["meta"], state["opt"]
        data_gen.set_state(state["rng"])

    def checkpoint(step: int) -> Path:
        return save_checkpoint(
            run_dir, step, {"meta": meta, "opt": opt_state, "rng": {"data": data_gen.get_state()}},
            {"config": cfg.to_dict()}, keep=cfg.keep_checkpoints,
        )  # fmt: skip

    stop: list[int] = []
    handlers = {
        s: signal.signal(s, lambda signum, frame: stop.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    log = (run_dir / "metrics.jsonl").open("a") if lead else None
    board = _tensorboard(run_dir) if lead else None
    bar = tqdm(
        total=cfg.iterations,
        initial=start,
        disable=quiet or not lead,
        desc=f"{cfg.algorithm} {cfg.dataset}",
        dynamic_ncols=True,
    )
    crash_at = launch.injected_crash_step(rank)
    stopping = False  # under torch.distributed: some rank was signalled (all ranks agree)
    t0 = time.perf_counter()
    step = start
    try:
        for step in range(start, cfg.iterations):
            if stopping or (world == 1 and stop):
                if lead:
                    path = checkpoint(step)
                    print(
                        f"\nstopped by signal at step {step}; saved {path.name}. Resume with:\n"
                        f"  metafunc train --resume {run_dir}"
                    )
                return {"interrupted": step}
            if step == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            grads, loss, metrics, batch = train_step(
                run, meta, data_gen, step, rank=rank, world=world
            )
            if world > 1:  # the mean over the global batch, and whether any rank was signalled
                flag = torch.tensor(float(bool(stop)), dtype=loss.dtype, device=loss.device)
                tree = {"grads": grads, "loss": loss, "metrics": metrics, "stop": flag}
                tree = mdist.all_reduce_mean(tree, weight=count)
                grads, loss, metrics = tree["grads"], tree["loss"], tree["metrics"]
                stopping = bool(tree["stop"] > 0)
            _check_finite(step, loss, grads, run, meta, batch, first_task=first, world=world)
            updates, opt_state = opt.update(grads, opt_state, meta)
            meta = optim.apply_updates(meta, updates)
            done = step + 1
            if log is not None and (done % cfg.log_every == 0 or done == cfg.iterations):
                elapsed = time.perf_counter() - t0
                record = {
                    "step": done,
                    "time": round(elapsed, 3),
                    **{k: float(v) for k, v in metrics.items()},
                    **_learning_rates(schedule, step, meta),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    for k, v in record.items():
                        if k != "step":
                            board.add_scalar(f"train/{k}", v, done)
                bar.set_postfix(
                    {k: f"{float(v):.3f}" for k, v in metrics.items()}
                    | {"tasks/s": f"{(done - start) * cfg.meta_batch / elapsed:.0f}"}
                )
            bar.update(1)
            if lead and (done % cfg.checkpoint_every == 0 or done == cfg.iterations):
                checkpoint(done)
            if sync_every and (done % sync_every == 0 or done == cfg.iterations):
                mdist.assert_in_sync(
                    {"meta": meta, "opt": opt_state},
                    what=f"train: after step {done}, the meta-parameters and optimizer state",
                )
    finally:
        bar.close()
        if log is not None:
            log.close()
        if board is not None:
            board.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    results = evaluate(run, meta)
    results["train_seconds"] = round(time.perf_counter() - t0, 1)
    if lead:
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        if not quiet:
            print(_format_results(results, cfg.is_regression))
    return results


def _tensorboard(run_dir: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``run_dir/tensorboard`` when the ``tensorboard``
    package is installed (``pip install tensorboard``), else ``None``."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _learning_rates(schedule: Any, step: int, meta: Any) -> dict[str, float]:
    """The outer learning rate applied at ``step``, and the mean learned inner learning rate of
    algorithms that meta-learn one (Meta-SGD, MAML++: ``meta['lr']``)."""
    rates = {"outer_lr": float(schedule(torch.tensor(step)))}
    if isinstance(meta, dict) and "lr" in meta:
        leaves = mt.leaves(meta["lr"])
        rates["inner_lr_mean"] = float(sum(x.double().mean() for x in leaves) / len(leaves))
    return rates


def set_threads(cfg: Config) -> None:
    """``torch.set_num_threads`` for ``cfg.threads`` (``None``: 1 for the sinusoid)."""
    threads = cfg.threads or (1 if cfg.is_regression else None)
    if threads is not None:
        torch.set_num_threads(threads)


def load_run(run_dir: str | Path) -> tuple[Run, Any, Path]:
    """``(run, meta_params, checkpoint path)`` of a run folder's latest checkpoint."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None or not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir}: no config.json and checkpoint (ckpt-*.safetensors) in that folder; "
            "pass the folder `metafunc train` wrote."
        )
    cfg = Config.from_dict(
        json.loads((run_dir / "config.json").read_text()), source=f"{run_dir}/config.json"
    )
    run = build(cfg)
    _, trees, _ = load_checkpoint(
        ckpt, {"meta": run.algorithm.init(dtype=run.dtype, device=run.device)}
    )
    return run, trees["meta"], ckpt
