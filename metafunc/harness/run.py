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
from metafunc.harness.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from metafunc.harness.compiling import (
    remember_compile,
    resolve_compile,
    step_cache,
    use_inductor_cache,
)
from metafunc.harness.config import Config, ConfigError
from metafunc.step import Step, StepState, compile_step
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
    validation_tasks: Any = None  # None: the benchmark has no validation split
    meta_grad: Any = None  # algorithm.meta_grad, or its compiled form with config.compile

    def __post_init__(self) -> None:
        if self.meta_grad is None:
            alg = self.algorithm
            mode = self.config.compile
            eager = mode is None or mode in ("auto", "off")
            grad = alg.meta_grad if eager else alg.compiled_meta_grad(str(mode))

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
            "tiered-imagenet": "conv4-maxpool",
            "cub": "conv4-maxpool",
            "fc100": "conv4-maxpool",
        }.get(cfg.dataset, "conv4")
    if kind == "mlp":
        if not cfg.is_regression:
            raise ConfigError(f"config: model='mlp' is for the sinusoid, not {cfg.dataset}.")
        if cfg.kernels != "auto":
            raise ConfigError(
                "config: kernels is for the convolutional models (conv4, resnet12); "
                "model='mlp' has no convolutions: drop it."
            )
        h = cfg.hidden or 40
        return models.mlp((1, h, h, 1))
    if cfg.is_regression:
        raise ConfigError(f"config: model={kind!r} takes images; use model='mlp' (or auto).")
    kernels = cfg.kernels
    if kernels == "auto":  # metafunc.kernels where the run computes: on the CPU
        kernels = "cpu" if cfg.device == "cpu" else "reference"
    if kind == "conv4":
        return models.conv4(
            ways,
            hidden=cfg.hidden or 64,
            in_channels=1 if "omniglot" in cfg.dataset else 3,
            kernels=kernels,
        )
    if kind == "conv4-maxpool":
        size = cfg.image_size or (84 if cfg.dataset in ("mini-imagenet", "tiered-imagenet",
                                                         "cub") else 32)  # fmt: skip
        return models.conv4(
            ways,
            hidden=cfg.hidden or 32,
            in_channels=3,
            pooling="maxpool",
            image_size=size,
            kernels=kernels,
        )
    return models.resnet12(ways, kernels=kernels)


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
    heads = {"protonet": algorithms.ProtoNet, "r2d2": algorithms.R2D2,
             "metaoptnet": algorithms.MetaOptNet}  # fmt: skip
    if name in heads:
        head: dict[str, Any] = {"head": cfg.head} if name == "metaoptnet" else {}
        return heads[name](
            build_model(cfg, None), shots=cfg.shots, halve_every=cfg.halve_every or None,
            **head, **common,
        )  # fmt: skip
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
        if not cfg.download:
            raise ConfigError(
                f"config: data_root={root!r} (--data-root) does not exist; pass the folder "
                "holding the dataset" + (", or add --download to fetch Omniglot into it."
                                         if cfg.dataset.startswith("omniglot") else ".")
            )  # fmt: skip
        Path(root).mkdir(parents=True)
    common: dict[str, Any] = {"device": device, "dtype": dtype}
    options: dict[str, Any] = {}
    if cfg.dataset.startswith("omniglot"):
        options["protocol"] = cfg.protocol
        if cfg.rotate_test:
            options["eval_rotations"] = (0, 90, 180, 270)
        if cfg.validation_alphabets:
            options["validation_alphabets"] = cfg.validation_alphabets
        if cfg.augment != "none":
            options["augment"] = cfg.augment
        if cfg.mirror:
            options["mirror"] = True
        if cfg.train_protocol != "random":
            options["train_protocol"] = cfg.train_protocol
    if cfg.image_size is not None:
        options["image_size"] = cfg.image_size
    if cfg.download:  # Omniglot's official zips (a mirror: $METAFUNC_OMNIGLOT_URL)
        options["download"] = True
        mirror = os.environ.get("METAFUNC_OMNIGLOT_URL")
        if mirror:
            options["base_url"] = mirror
    ways = None if cfg.is_regression else (cfg.ways or 5)
    train_kw = dict(common) if ways is None else {**common, "ways": cfg.train_ways or ways}
    test_kw = dict(common) if ways is None else {**common, "ways": ways}
    try:
        train = get_benchmark(  # the protocol picks evaluation episodes, at evaluation's ways
            cfg.dataset, root, shots=cfg.shots, queries=cfg.queries, **train_kw,
            **{k: v for k, v in options.items() if k != "protocol"},
        ).train  # fmt: skip
        evaluation = get_benchmark(
            cfg.dataset,
            root,
            shots=cfg.eval_shots or cfg.shots,
            queries=cfg.eval_queries or cfg.queries,
            **test_kw,
            **{k: v for k, v in options.items() if k != "train_protocol"},
        )
    except (FileNotFoundError, ValueError) as error:
        if not _missing_data(error):
            raise
        raise ConfigError(_data_help(cfg, error)) from None
    if cfg.precision in ("ieee", "tf32"):
        torch.backends.cuda.matmul.fp32_precision = cfg.precision
        torch.backends.cudnn.conv.fp32_precision = cfg.precision  # type: ignore[attr-defined]
    alg = build_algorithm(cfg, train, cfg.strategy)
    eval_alg = alg
    if isinstance(alg, algorithms.ProtoNet):  # R2D2, MetaOptNet too: test shots may differ
        eval_alg = dataclasses.replace(alg, shots=cfg.eval_shots or cfg.shots)
    if cfg.eval_every and evaluation.validation is None:
        raise ConfigError(
            f"config: eval_every (--eval-every) scores the validation split, and {cfg.dataset} "
            "has none here: add --validation-alphabets N (Omniglot's Lake splits)."
        )
    return Run(cfg, alg, eval_alg, train, evaluation.test, device, dtype, evaluation.validation)


def _missing_data(error: Exception) -> bool:
    """Whether a benchmark loader's error says the data is not there."""
    text = str(error)
    return isinstance(error, FileNotFoundError) or "no data folder" in text


def _data_help(cfg: Config, error: Exception) -> str:
    """What a user of the command does about missing data: the flags, not the library's
    arguments."""
    where = cfg.data_root or os.environ.get("METAFUNC_DATA")
    found = f"looked in {where}" if where else "no --data-root given and METAFUNC_DATA unset"
    fix = "pass --data-root FOLDER (the folder holding the dataset's own folder)"
    if cfg.dataset.startswith("omniglot"):
        fix += ", or add --download to fetch Omniglot's official zips (md5-checked) into it"
    if "no data folder" in str(error):
        return f"train: the {cfg.dataset} data is missing ({found}); {fix}."
    detail = str(error).split(": ", 1)[-1]  # which file, in the command's words
    detail = detail.replace("pass download=True", "add --download").replace("root=", "--data-root ")
    return f"train: the {cfg.dataset} data is missing ({found}); {fix}. In detail: {detail}"


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


#: The seed of the fixed test episodes every evaluation of a run scores (``metafunc eval``'s
#: ``--seed`` default).
TEST_SEED = 1234


def evaluate(
    run: Run,
    meta: Any,
    *,
    episodes: int | None = None,
    seed: int = TEST_SEED,
    split: str = "test",
) -> dict[str, Any]:
    """The standard protocol: a fixed, seeded set of test episodes (``split='validation'``: of
    validation episodes); mean ± 95% interval of the query loss (and accuracy) after each of
    ``report_steps`` inner steps. Under ``protocol='within-alphabet'`` the episodes are Lake et
    al.'s runs, whose error is one minus the accuracy.

    Under ``torch.distributed`` every rank must call it: the batches of episodes are dealt to the
    ranks in turn and their per-episode metrics all-gathered, so every rank returns the same
    results as one process would."""
    cfg = run.config
    count = episodes or cfg.eval_episodes
    rank, world = mdist.rank(), mdist.world_size()
    mine: list[tuple[int, dict[str, torch.Tensor]]] = []
    tasks = run.test_tasks if split == "test" else run.validation_tasks
    for i, batch in enumerate(tasks.episodes(count, seed, batch_size=cfg.eval_batch)):
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
    results: dict[str, Any] = {
        "split": split, "protocol": cfg.protocol, "episodes": count, "seed": seed,
        "steps": list(cfg.report_steps),
    }  # fmt: skip
    for k, chunks in per_step.items():
        values = torch.cat(chunks)  # [episodes, steps + 1]
        mean = values.mean(0)
        ci = 1.96 * values.std(0) / math.sqrt(values.shape[0])
        results[k] = {
            str(s): {"mean": float(mean[s]), "ci95": float(ci[s])} for s in cfg.report_steps
        }
    return results


def format_results(results: dict[str, Any], regression: bool) -> str:
    key = "loss" if regression else "accuracy"
    name = "MSE" if regression else "accuracy"
    scale = 1.0 if regression else 100.0
    lake = results.get("protocol") == "within-alphabet"
    lines = []
    for s, v in results[key].items():
        mean = v["mean"]
        if lake:  # Lake et al. report the error
            name, mean = "error %", 1.0 - mean
        lines.append(f"  {name} after {s:>2} steps: {scale * mean:.3f} ± {scale * v['ci95']:.3f}")
    what = "runs within one alphabet" if lake else "episodes"
    which = f", checkpoint {results['checkpoint']}" if "checkpoint" in results else ""
    return (
        f"{results.get('split', 'test')} ({results['episodes']} {what}{which}, 95% interval):\n"
        + "\n".join(lines)
    )


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


def _distributed_or_pretraining_step(
    run: Run,
    opt: Any,
    meta: Any,
    opt_state: Any,
    data_gen: torch.Generator,
    step: int,
    stop: list[int],
    *,
    rank: int,
    world: int,
    count: int,
    first: int,
) -> tuple[Any, Any, dict[str, torch.Tensor], bool]:
    """One step of a data-parallel or pretraining run: this rank's meta-gradient (or pretraining
    gradient), averaged over the ranks with whether any was signalled, checked, applied.
    Returns ``(meta, opt_state, metrics, stopping)``."""
    grads, loss, metrics, batch = train_step(run, meta, data_gen, step, rank=rank, world=world)
    stopping = False
    if world > 1:  # the mean over the global batch, and whether any rank was signalled
        flag = torch.tensor(float(bool(stop)), dtype=loss.dtype, device=loss.device)
        tree = {"grads": grads, "loss": loss, "metrics": metrics, "stop": flag}
        tree = mdist.all_reduce_mean(tree, weight=count)
        grads, loss, metrics = tree["grads"], tree["loss"], tree["metrics"]
        stopping = bool(tree["stop"] > 0)
    _check_finite(step, loss, grads, run, meta, batch, first_task=first, world=world)
    updates, opt_state = opt.update(grads, opt_state, meta)
    return optim.apply_updates(meta, updates), opt_state, metrics, stopping


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
    try:
        result = _train(cfg, Path(run_dir), resume=resume, quiet=quiet, ctx=ctx)
        mdist.shutdown(ctx)  # every rank together
        return result
    finally:  # also on errors (a group left alive can abort the interpreter at exit); after the
        mdist.shutdown(ctx, together=False)  # shutdown above the group is gone: a no-op


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
    alg = run.algorithm
    meta = init_meta(run, cfg.seed)
    opt = alg.outer_optimizer(cfg.outer_lr, cfg.iterations)
    schedule = alg.outer_schedule(cfg.outer_lr, cfg.iterations)
    opt_state = opt.init(meta)
    # one process on meta-batches: the whole training step, eager or compiled (compile_step);
    # data-parallel and pretraining runs take the meta-gradient and update the meta-parameters
    # themselves, with config.compile applied to the meta-gradient alone
    step_fn: Step | None = None
    compiled: dict[str, Any] = {}
    if world == 1 and not pretrains(run):
        use_inductor_cache()
        if cfg.compile == "auto":  # decided once; config.json keeps the choice for a resume
            choice, compiled, step_fn = resolve_compile(cfg, run, meta, opt, cfg.iterations)
            cfg = cfg.replace(compile=choice)
        else:
            mode = None if cfg.compile == "off" else cfg.compile
            step_fn = compile_step(alg, opt, mode=mode, cache=step_cache(cfg) if mode else None)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if timings:  # what 'auto' measured (seconds per step), beside the choice in config.json
            (run_dir / "strategy.json").write_text(json.dumps(timings, indent=2) + "\n")
            if not quiet:
                size = cfg.chunk_size if cfg.strategy == "chunked" else None
                print(f"strategy 'auto': {strategy_label(cfg.strategy, size)}, the fastest of "
                      f"{_format_timings(timings)} per step")  # fmt: skip
        if compiled:  # what compile 'auto' measured, beside the choice in config.json
            (run_dir / "compile.json").write_text(json.dumps(compiled, indent=2) + "\n")
            if not quiet:
                print(f"compile 'auto': {compiled['choice']} ({compiled['why']})")
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

    best = _best_score(run_dir) if cfg.keep_best else None

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
    key = torch.zeros((), dtype=torch.int64, device=run.device)  # no in-step sampler here
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
            if step_fn is not None:
                batch = run.train_tasks.sample(cfg.meta_batch, data_gen)
                with run.precision():
                    after, metrics = step_fn(StepState(meta, opt_state, key), batch, iteration=step)
                if not bool(metrics.pop("finite")):  # the pre-step state is kept: explain
                    grads, _, _ = alg.meta_grad(meta, batch, iteration=step)
                    _check_finite(step, metrics["loss"], grads, run, meta, batch)
                meta, opt_state = after.meta, after.opt_state
            else:
                meta, opt_state, metrics, stopping = _distributed_or_pretraining_step(
                    run, opt, meta, opt_state, data_gen, step, stop, rank=rank, world=world,
                    count=count, first=first,
                )  # fmt: skip
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
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.iterations):
                scores = validate(run, meta)  # every rank: evaluate deals episodes to ranks
                if log is not None:
                    log.write(json.dumps({"step": done, **scores}) + "\n")
                    log.flush()
                score = scores["val_loss" if cfg.is_regression else "val_accuracy"]
                if cfg.keep_best and lead and _better(score, best, cfg.is_regression):
                    best = score
                    save_checkpoint(run_dir, done, {"meta": meta}, {"score": score},
                                    name=BEST)  # fmt: skip
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
    train_seconds = time.perf_counter() - t0
    if step_fn is not None and step_fn.compile_seconds and not compiled and step > start:
        compile_s = step_fn.compile_seconds[0]
        per_step_ms = 1e3 * (train_seconds - compile_s) / (step + 1 - start)
        remember_compile(cfg, step_fn, compile_s, per_step_ms)
    which = f"final (step {cfg.iterations})"
    if cfg.keep_best:  # every rank reads the file rank 0 wrote (torchrun shares a file system)
        if world > 1:
            torch.distributed.barrier()
        step_best, meta = load_best(run, run_dir)
        which = f"{BEST} (step {step_best})"
    results = {**evaluate(run, meta), "checkpoint": which, "train_seconds": round(train_seconds, 1)}
    if lead:
        (run_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        if not quiet:
            print(format_results(results, cfg.is_regression))
    return results


BEST = "best.safetensors"
"""The best-on-validation meta-parameters of a ``keep_best`` run, in its run folder."""
VALIDATION_SEED = 4321
"""Seed of the validation episodes: fixed, so scores are comparable across steps and runs."""


def validate(run: Run, meta: Any) -> dict[str, float]:
    """The validation scores ``eval_every`` logs: mean query loss and accuracy after the last
    report step, on ``val_episodes`` fixed validation episodes."""
    cfg = run.config
    results = evaluate(run, meta, episodes=cfg.val_episodes, seed=VALIDATION_SEED,
                       split="validation")  # fmt: skip
    last = str(cfg.report_steps[-1])
    return {f"val_{k}": results[k][last]["mean"] for k in ("loss", "accuracy") if k in results}


def _better(score: float, best: float | None, regression: bool) -> bool:
    return best is None or (score < best if regression else score > best)


def _best_score(run_dir: Path) -> float | None:
    """The score of the run's best checkpoint so far (``None``: none yet), for a resumed run."""
    from safetensors import safe_open

    if not (run_dir / BEST).is_file():
        return None
    with safe_open(str(run_dir / BEST), framework="pt") as f:
        return float(json.loads((f.metadata() or {})["metadata"])["score"])


def load_best(run: Run, run_dir: Path) -> tuple[int, Any]:
    """``(step, meta-parameters)`` of the run's best-on-validation checkpoint."""
    template = {"meta": run.algorithm.init(dtype=run.dtype, device=run.device)}
    step, trees, _ = load_checkpoint(run_dir / BEST, template)
    return step, trees["meta"]


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


def load_run(run_dir: str | Path, **changes: Any) -> tuple[Run, Any, str]:
    """``(run, meta-parameters, which checkpoint)`` of a run folder: its best-on-validation
    checkpoint if it kept one (``keep_best``), else its latest.

    ``changes``: config keys to evaluate under instead, e.g. ``protocol='within-alphabet'``, or
    ``dataset`` (with ``data_root``) for cross-domain evaluation: the run's model scores the
    other benchmark's test classes, at that benchmark's image size and normalisation, which the
    model must accept (mini-ImageNet to CUB, say)."""
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None or not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{run_dir}: no config.json and checkpoint (ckpt-*.safetensors) in that folder; "
            "pass the folder `metafunc train` wrote."
        )
    trained = Config.from_dict(
        json.loads((run_dir / "config.json").read_text()), source=f"{run_dir}/config.json"
    )
    if trained.keep_best and (run_dir / BEST).is_file():
        ckpt = run_dir / BEST
    other = changes.get("dataset", trained.dataset) != trained.dataset
    if other:  # the training run's validation settings belong to its own dataset
        changes = {"validation_alphabets": 0, "eval_every": 0, "keep_best": False,
                   "protocol": "random", "train_protocol": "random", "augment": "none",
                   "download": False,
                   **changes}  # fmt: skip
    cfg = trained.replace(**changes)
    run = build(cfg)
    template = {"meta": run.algorithm.init(dtype=run.dtype, device=run.device)}
    try:
        step, trees, _ = load_checkpoint(ckpt, template)
    except CheckpointError as err:
        if not other:
            raise
        raise ConfigError(
            f"eval {run_dir} --dataset {cfg.dataset}: the model trained on {trained.dataset} "
            f"does not take {cfg.dataset}'s images ({err}). Cross-domain evaluation needs "
            "benchmarks of one image size and channel count (e.g. mini-imagenet and cub)."
        ) from None
    return run, trees["meta"], f"{ckpt.name} (step {step})"
