"""Experiment configuration: one frozen dataclass, built from presets, files and flags, validated
up front, saved to the run folder."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["ALGORITHMS", "FLAGS", "PRESETS", "Config", "ConfigError", "load_config_file"]

ALGORITHMS = (
    "maml", "fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml", "protonet", "r2d2",
    "metaoptnet", "baseline",
)  # fmt: skip
INNER_OPTIMIZERS = ("sgd", "adam")
FINETUNE = ("head", "all")
MODELS = ("auto", "mlp", "conv4", "conv4-maxpool", "resnet12")
DATASETS = (
    "sinusoid", "omniglot", "omniglot-lake", "omniglot-small1", "omniglot-small2",
    "mini-imagenet", "cifar-fs", "tiered-imagenet", "cub", "fc100",
)  # fmt: skip
STRATEGIES = ("auto", "vmap", "chunked", "loop", "threads")
DTYPES = ("float32", "float64")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes
COMPILE_CHOICES = ("auto", "off", *COMPILE_MODES)
PRECISIONS = ("default", "ieee", "tf32", "bf16")
PROTOCOLS = ("random", "within-alphabet")  # metafunc.data.PROTOCOLS, without importing torch
AUGMENTATIONS = ("none", "affine", "elastic")  # metafunc.data.AUGMENTATIONS
HEADS = ("svm", "ridge")  # MetaOptNet's
KERNELS = ("auto", "reference", "cpu")  # metafunc.models.base.KERNELS, and auto


class ConfigError(ValueError):
    """A user error in the configuration: reported without a traceback."""


# What each key is, as `metafunc train --help` shows it: (group, help). Every key has one.
FLAGS: dict[str, tuple[str, str]] = {
    "algorithm": ("task", "the meta-learning algorithm"),
    "dataset": ("task", "the benchmark (Omniglot, mini-ImageNet, CIFAR-FS need --data-root)"),
    "ways": ("task", "classes per task (default 5; none for the sinusoid)"),
    "shots": ("task", "support examples per class (sinusoid: support points)"),
    "queries": ("task", "query examples per class (default 15; sinusoid: shots)"),
    "data_root": ("task", "the folder holding the dataset (default $METAFUNC_DATA)"),
    "download": ("task", "fetch Omniglot's official zips (md5-checked) into --data-root"),
    "rotate_test": ("task", "Omniglot: test classes rotated by 90-degree multiples as new ones"),
    "protocol": ("task", "Omniglot evaluation: random episodes, or Lake et al.'s runs"),
    "augment": ("task", "Omniglot: training images distorted: affine maps, + elastic bends"),
    "mirror": ("task", "Omniglot: training characters mirrored as new characters too"),
    "train_protocol": ("task", "Omniglot training episodes: random, or within one alphabet"),
    "image_size": ("task", "image side in pixels (default: the benchmark's, Omniglot 28)"),
    "validation_alphabets": ("task", "Omniglot Lake splits: alphabets held out to validate"),
    "model": ("model", "the network; auto: mlp for the sinusoid, conv4 for images"),
    "hidden": ("model", "hidden units / channels (default: the paper's)"),
    "kernels": ("model", "conv layers; auto: cpu (metafunc.kernels) on the CPU, else reference"),
    "inner_lr": ("inner loop", "the inner optimizer's learning rate"),
    "inner_steps": ("inner loop", "inner steps per task in training"),
    "first_order": ("inner loop", "detach the inner gradients (first-order)"),
    "inner_checkpoint": ("inner loop", "recompute inner steps in the backward: memory flat"),
    "meta_batch": ("outer loop", "tasks per meta-batch"),
    "iterations": ("outer loop", "outer steps (meta-batches)"),
    "outer_lr": ("outer loop", "the outer optimizer's learning rate"),
    "seed": ("outer loop", "seed of the initial parameters and the tasks"),
    "eval_shots": ("evaluation", "support examples per class in evaluation"),
    "eval_queries": ("evaluation", "query examples per class in evaluation (default: queries)"),
    "eval_inner_steps": ("evaluation", "inner steps at test time"),
    "report_steps": ("evaluation", "inner steps after which the test metrics are reported"),
    "eval_episodes": ("evaluation", "fixed test episodes of the final evaluation"),
    "eval_batch": ("evaluation", "test episodes per batch"),
    "eval_every": ("evaluation", "steps between validation scores in metrics.jsonl (0: never)"),
    "val_episodes": ("evaluation", "fixed validation episodes per score"),
    "keep_best": ("evaluation", "keep the best-on-validation checkpoint and test it"),
    "device": ("speed", "cpu or cuda[:N]"),
    "dtype": ("speed", "floating dtype of the parameters and data"),
    "threads": ("speed", "torch intra-op threads (default: 1 for the sinusoid)"),
    "strategy": ("speed", "how tasks map: auto times the others on this run's work"),
    "chunk_size": ("speed", "tasks per vmap chunk, with --strategy chunked"),
    "compile": ("speed", "torch.compile the training step; auto: when it pays"),
    "precision": ("speed", "float32 compute: bf16 autocast, tf32 on CUDA, or ieee"),
    "log_every": ("run folder", "steps between metrics.jsonl lines"),
    "checkpoint_every": ("run folder", "steps between checkpoints"),
    "keep_checkpoints": ("run folder", "checkpoints kept"),
    "train_ways": ("algorithm-specific", "ProtoNets, R2D2, MetaOptNet: training episodes' ways"),
    "halve_every": ("algorithm-specific", "ProtoNets, R2D2, MetaOptNet: outer lr halved every"),
    "inner_optimizer": ("algorithm-specific", "Reptile, iMAML, baseline: sgd or adam"),
    "anneal": ("algorithm-specific", "Reptile: outer step size annealed linearly to 0"),
    "lam": ("algorithm-specific", "iMAML: proximal weight lambda"),
    "head": ("algorithm-specific", "MetaOptNet: svm (MetaOptNet-SVM) or ridge (MetaOptNet-RR)"),
    "cg_steps": ("algorithm-specific", "iMAML: conjugate-gradient steps"),
    "finetune": ("algorithm-specific", "baseline: fine-tune the head or all"),
    "weights": ("algorithm-specific", "baseline: a pretrained backbone file"),
    "batch_size": ("algorithm-specific", "baseline (classification): images per step"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "algorithm": ALGORITHMS, "dataset": DATASETS, "model": MODELS, "strategy": STRATEGIES,
    "dtype": DTYPES, "inner_optimizer": INNER_OPTIMIZERS, "finetune": FINETUNE,
    "precision": PRECISIONS, "compile": COMPILE_CHOICES, "protocol": PROTOCOLS, "head": HEADS,
    "train_protocol": PROTOCOLS,
    "augment": AUGMENTATIONS, "kernels": KERNELS,
}  # fmt: skip
GROUPS = ("task", "model", "inner loop", "outer loop", "evaluation", "speed", "run folder",
          "algorithm-specific")  # fmt: skip

# keys that only some algorithms read: setting one for another algorithm is refused
ONLY_FOR: dict[str, tuple[str, ...]] = {
    "train_ways": ("protonet", "r2d2", "metaoptnet"),
    "halve_every": ("protonet", "r2d2", "metaoptnet"),
    "head": ("metaoptnet",),
    "inner_optimizer": ("reptile", "imaml", "baseline"),
    "anneal": ("reptile",),
    "lam": ("imaml",),
    "cg_steps": ("imaml",),
    "finetune": ("baseline",),
    "weights": ("baseline",),
    "batch_size": ("baseline",),
    "first_order": ("maml", "anil", "metasgd", "mamlpp"),
    "inner_checkpoint": ("maml", "fomaml", "anil", "metasgd", "mamlpp"),
}


@dataclass(frozen=True)
class Config:
    """Everything a run needs. The defaults are the quick sinusoid MAML run of ``metafunc train``:
    the paper's network and settings (Finn et al. 2017, §5.1: 1-40-40-1 MLP, one inner step
    at 0.01, K=10, meta-batch 25, Adam 1e-3), shortened to 5,000 iterations, evaluated 5-shot.

    ``threads``: torch intra-op threads (``None``: 1 for the sinusoid's tiny network, where more
    threads only add overhead, else torch's default); under ``strategy='threads'`` (which
    ``--strategy auto`` may pick on the CPU) this many tasks run at once, each on one thread.
    ``inner_checkpoint``: gradient checkpointing across inner steps (the MAML family):
    memory flat in ``inner_steps``, the same gradient. Algorithm-specific keys (ignored by the
    others): ``train_ways`` (ProtoNets' training ways, default ``ways``), ``inner_optimizer``
    (``'sgd'``/``'adam'``: Reptile, iMAML, baseline), ``anneal`` (Reptile's linear ε
    annealing; ε is ``outer_lr``),
    ``lam`` and ``cg_steps`` (iMAML), ``finetune`` (baseline: ``'head'`` or ``'all'``),
    ``weights`` (baseline: a pretrained backbone file), ``batch_size`` (baseline classification:
    images per pretraining step; an iteration is one such batch). ``rotate_test``: Omniglot test
    classes rotated by 90° multiples as new classes (MAML's and ProtoNets' protocol; Reptile's
    is without).
    ``compile``: ``'auto'`` (time the eager and the compiled training step on the run's own
    work, charge the compile time against the remaining iterations, keep the faster; the choice
    and timings go to ``compile.json``, and a resumed run keeps the choice), ``'off'`` (eager), or
    a ``torch.compile`` mode for the whole step (:func:`metafunc.compile_step`). Compiled
    artifacts are cached under the user cache directory, so a repeated config compiles quicker.
    ``precision`` of float32 compute: ``'default'`` (torch's: on CUDA, TF32 convolutions and
    IEEE matmuls), ``'ieee'`` (full float32 everywhere), ``'tf32'`` (TF32 matmuls and
    convolutions, CUDA) or ``'bf16'`` (``torch.autocast`` to bfloat16 around every meta-gradient
    and evaluation; see the README for its measured meta-gradient error). ``kernels``: the
    convolution and batch norm of conv4 / ResNet-12 (:func:`~metafunc.models.conv4`):
    ``'reference'``, the plain layers; ``'cpu'``, :mod:`metafunc.kernels` (the same values,
    faster on the CPU); ``'auto'``, ``'cpu'`` when ``device`` is the CPU, else ``'reference'``.
    A config saved with the older ``channels_last`` key loads with ``kernels='reference'`` for
    ``false`` (the default layout everywhere) and ``'auto'`` otherwise.
    """

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    model: str = "auto"
    hidden: int | None = None
    ways: int | None = None
    train_ways: int | None = None
    halve_every: int = 2000
    shots: int = 10
    queries: int | None = None
    eval_shots: int | None = 5
    eval_queries: int | None = None
    inner_lr: float = 0.01
    inner_steps: int = 1
    eval_inner_steps: int = 10
    report_steps: tuple[int, ...] = (0, 1, 10)
    first_order: bool = False
    inner_checkpoint: bool = False
    inner_optimizer: str | None = None
    anneal: bool = False
    lam: float = 2.0
    head: str = "svm"
    cg_steps: int = 5
    finetune: str | None = None
    weights: str | None = None
    batch_size: int = 128
    rotate_test: bool = True
    protocol: str = "random"
    train_protocol: str = "random"
    image_size: int | None = None
    augment: str = "none"
    mirror: bool = False
    validation_alphabets: int = 0
    meta_batch: int = 25
    iterations: int = 5000
    outer_lr: float = 1e-3
    device: str = "cpu"
    threads: int | None = None
    dtype: str = "float32"
    seed: int = 0
    strategy: str = "auto"
    chunk_size: int | None = None
    compile: str | None = "auto"
    precision: str = "default"
    kernels: str = "auto"
    eval_episodes: int = 600
    eval_batch: int = 50
    eval_every: int = 0
    val_episodes: int = 200
    keep_best: bool = False
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    data_root: str | None = None
    download: bool = False
    preset: str | None = None

    def __post_init__(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ConfigError(
                    f"config: {name}={getattr(self, name)!r} is not one of {', '.join(options)}."
                )

        def positive(name: str, *, allow_zero: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok or value < (0 if allow_zero else 1):
                bound = ">= 0" if allow_zero else ">= 1"
                raise ConfigError(f"config: {name} must be an integer {bound}, got {value!r}.")

        choice("algorithm", ALGORITHMS)
        defaults = {f.name: f.default for f in fields(self)}
        for key, owners in ONLY_FOR.items():
            if self.algorithm not in owners and getattr(self, key) != defaults[key]:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"config: {key} ({flag}) applies to {', '.join(owners)}, not "
                    f"{self.algorithm}; drop it, or pick one of those algorithms."
                )
        if self.download and not self.dataset.startswith("omniglot"):
            raise ConfigError(
                f"config: download (--download) fetches Omniglot; {self.dataset} is read from "
                "--data-root."
            )
        choice("dataset", DATASETS)
        choice("protocol", PROTOCOLS)
        choice("train_protocol", PROTOCOLS)
        if self.image_size is not None and self.dataset in ("sinusoid", "cifar-fs", "fc100"):
            raise ConfigError(
                f"config: image_size (--image-size) resizes the images of Omniglot, "
                f"mini-ImageNet, tiered-ImageNet and CUB; {self.dataset}'s are fixed. Drop it."
            )
        choice("augment", AUGMENTATIONS)
        choice("head", HEADS)
        if self.augment != "none" and not self.dataset.startswith("omniglot"):
            raise ConfigError(
                f"config: augment={self.augment!r} (--augment) distorts Omniglot's strokes on "
                f"black; {self.dataset} is not supported. Drop it."
            )
        if self.mirror and not self.dataset.startswith("omniglot"):
            raise ConfigError(
                f"config: mirror (--mirror) makes new Omniglot characters of mirrored ones; "
                f"{self.dataset}'s mirrored images are the same classes. Drop it."
            )
        lake_split = self.dataset in ("omniglot-lake", "omniglot-small1", "omniglot-small2")
        for key in ("protocol", "train_protocol"):
            if getattr(self, key) != "random" and not self.dataset.startswith("omniglot"):
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"config: {key}={getattr(self, key)!r} ({flag}) draws Omniglot's alphabets; "
                    f"{self.dataset} has none. Drop it."
                )
        if self.validation_alphabets and not lake_split:
            raise ConfigError(
                "config: validation_alphabets (--validation-alphabets) holds out alphabets of "
                "the Lake splits (omniglot-lake, omniglot-small1, omniglot-small2), not "
                f"{self.dataset}."
            )
        if self.keep_best and not self.eval_every:
            raise ConfigError(
                "config: keep_best (--keep-best) keeps the best validation score, and none is "
                "taken: add --eval-every N."
            )
        choice("model", MODELS)
        choice("kernels", KERNELS)
        choice("strategy", STRATEGIES)
        choice("dtype", DTYPES)
        for name, options in (("inner_optimizer", INNER_OPTIMIZERS), ("finetune", FINETUNE)):
            if getattr(self, name) is not None:
                choice(name, options)
        for name in (
            "shots",
            "meta_batch",
            "iterations",
            "eval_episodes",
            "eval_batch",
            "inner_steps",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "cg_steps",
            "batch_size",
            "val_episodes",
        ):
            positive(name)
        positive("eval_every", allow_zero=True)
        positive("halve_every", allow_zero=True)
        positive("validation_alphabets", allow_zero=True)
        positive("eval_inner_steps", allow_zero=True)
        for name in (
            "ways",
            "train_ways",
            "queries",
            "eval_shots",
            "eval_queries",
            "chunk_size",
            "hidden",
            "image_size",
        ):
            positive(name, optional=True)
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config: {name} must be a number >= 0, got {value!r}.")
        if not isinstance(self.lam, int | float) or isinstance(self.lam, bool) or self.lam <= 0:
            raise ConfigError(
                f"config: lam (iMAML's proximal weight) must be > 0, got {self.lam!r}; try 2.0."
            )
        if self.dataset == "sinusoid" and (self.ways is not None or self.train_ways is not None):
            raise ConfigError("config: the sinusoid has no classes; leave ways unset.")
        if self.dataset == "sinusoid" and self.algorithm in ("protonet", "r2d2", "metaoptnet"):
            raise ConfigError(
                f"config: algorithm={self.algorithm!r} classifies; pick a classification dataset "
                "(omniglot, mini-imagenet, cifar-fs), or another algorithm for the sinusoid."
            )
        if any(s < 0 or s > self.eval_inner_steps for s in self.report_steps):
            raise ConfigError(
                f"config: report_steps {self.report_steps} must lie in 0..eval_inner_steps "
                f"({self.eval_inner_steps})."
            )
        if self.algorithm == "mamlpp" and self.eval_inner_steps > self.inner_steps:
            raise ConfigError(
                f"config: MAML++ learns a learning rate and batch norm per inner step, so "
                f"eval_inner_steps ({self.eval_inner_steps}) must be <= inner_steps "
                f"({self.inner_steps})."
            )
        choice("precision", PRECISIONS)
        if self.precision == "tf32" and not self.device.startswith("cuda"):
            raise ConfigError(
                "config: precision='tf32' is a CUDA setting; on the CPU use 'default' or 'bf16'."
            )
        if self.precision == "bf16" and self.dtype != "float32":
            raise ConfigError(
                f"config: precision='bf16' autocasts float32 compute; dtype={self.dtype!r} "
                "would stay as it is: use dtype float32."
            )
        if self.compile is None:  # configs written before 'auto' and 'off' existed
            object.__setattr__(self, "compile", "off")
        choice("compile", COMPILE_CHOICES)
        why = self.compile_unavailable()
        if why and self.compile not in ("auto", "off"):
            raise ConfigError(f"config: compile={self.compile!r} is not available: {why}; "
                              "use --compile auto or off.")  # fmt: skip
        if not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"config: device must be 'cpu' or 'cuda[:N]', got {self.device!r}.")

    def compile_unavailable(self) -> str:
        """Why this config cannot compile its training step ("" when it can)."""
        if self.algorithm == "baseline" and not self.is_regression:
            return "the classification baseline pretrains a classifier; there is no meta-step"
        if self.inner_checkpoint:
            return "inner_checkpoint recomputes steps in a Python sweep"
        if self.algorithm == "imaml" or (self.algorithm == "metaoptnet" and self.head == "svm"):
            return "its implicit gradient (custom_root) does not compile"
        if self.precision == "bf16":
            return "bf16 autocast runs eagerly"
        return ""

    @property
    def is_regression(self) -> bool:
        return self.dataset == "sinusoid"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> Config:
        """Build from a mapping, rejecting unknown keys and wrong types with a clear message."""
        if "channels_last" in values:  # configs written before the kernels key
            if "kernels" in values:
                raise ConfigError(
                    f"{source}: channels_last is the older form of kernels; give kernels alone."
                )
            old = values["channels_last"]
            values = {k: v for k, v in values.items() if k != "channels_last"}
            values["kernels"] = "reference" if old is False else "auto"
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown}; valid keys are {sorted(known)}."
            )
        clean: dict[str, Any] = {}
        for key, value in values.items():
            clean[key] = _coerce(source, key, value, hints[key])
        return cls(**clean)

    def replace(self, **changes: Any) -> Config:
        return Config.from_dict({**self.to_dict(), **changes})


def _coerce(source: str, key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type (ints for floats allowed, lists for tuples)."""
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if value is None:
        if is_union and type(None) in args:
            return None
        raise ConfigError(f"{source}: {key} cannot be null.")
    base = next(a for a in args if a is not type(None)) if is_union else hint
    origin = typing.get_origin(base)
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{source}: {key} must be a list of integers, got {value!r}.")
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}.")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}.")
    if base in (str, float) and not isinstance(value, base):
        raise ConfigError(f"{source}: {key} must be a {base.__name__}, got {value!r}.")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML (needs PyYAML) config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise ConfigError(
                    f"--config {path}: YAML needs PyYAML (pip install pyyaml)."
                ) from err
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config {path}: use a .json, .toml or .yaml file.")
    except (json.JSONDecodeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"--config {path}: cannot parse: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of keys to values.")
    return data


# The papers' settings (see ../shared/REFERENCE.md). Iterations are the papers'; shorten them
# with --iterations on a CPU.
_SINUSOID = {"report_steps": [0, 1, 5, 10], "iterations": 70000}
_OMNIGLOT_1S = {"dataset": "omniglot", "shots": 1, "queries": 1, "eval_shots": 1, "eval_queries": 1}
_MAML_5W = {
    **_OMNIGLOT_1S, "ways": 5, "inner_lr": 0.4, "inner_steps": 1, "eval_inner_steps": 3,
    "report_steps": [0, 1, 3], "meta_batch": 32, "iterations": 60000,
}  # fmt: skip
_MAML_20W = {
    **_OMNIGLOT_1S, "ways": 20, "inner_lr": 0.1, "inner_steps": 5, "eval_inner_steps": 5,
    "report_steps": [0, 5], "meta_batch": 16, "iterations": 60000,
}  # fmt: skip
# Snell et al.: 60-way 5-query training episodes, one per iteration, Adam 1e-3 halved every 2,000.
_PROTONET = {
    **_OMNIGLOT_1S, "algorithm": "protonet", "train_ways": 60, "queries": 5, "eval_queries": 5,
    "meta_batch": 1, "eval_inner_steps": 0, "report_steps": [0], "iterations": 20000,
}  # fmt: skip
# Lake et al. 2015's one-shot protocol: trained on background alphabets only (5 of them held out
# for validation, scored every 1,000 steps on fixed within-alphabet runs, the best kept), tested
# on 20-way within-alphabet runs of the evaluation alphabets, support and query by two drawers.
_LAKE = {
    "dataset": "omniglot-lake", "protocol": "within-alphabet", "ways": 20, "eval_shots": 1,
    "eval_queries": 1, "validation_alphabets": 5, "eval_every": 1000, "keep_best": True,
    "rotate_test": False,
}  # fmt: skip
# chosen on the held-out alphabets (docs/reproducing.md): 20-way training episodes within one
# alphabet (rotated alphabets included) rather than 60-way episodes of any characters, and a
# conv4 of 128 channels rather than 64
_PROTONET_LAKE = {**_PROTONET, **_LAKE, "augment": "affine", "iterations": 40000,
                  "halve_every": 8000, "train_protocol": "within-alphabet",
                  "train_ways": 20, "hidden": 128}  # fmt: skip
PRESET_PAPERS: dict[str, str] = {
    "maml-sinusoid": "Finn et al. 2017",
    "baseline-sinusoid": "Finn et al. 2017 (baseline)",
    "maml-omniglot-5w1s": "Finn et al. 2017",
    "maml-omniglot-20w1s": "Finn et al. 2017",
    "fomaml-omniglot-5w1s": "Finn et al. 2017",
    "fomaml-omniglot-20w1s": "Finn et al. 2017",
    "anil-omniglot-20w1s": "Raghu et al. 2019",
    "mamlpp-omniglot-20w1s": "Antoniou et al. 2019",
    "protonet-omniglot-5w1s": "Snell et al. 2017",
    "protonet-omniglot-20w1s": "Snell et al. 2017",
    "r2d2-omniglot-5w1s": "Bertinetto et al. 2019",
    "metaoptnet-omniglot-5w1s": "Lee et al. 2019",
    "metaoptnet-rr-omniglot-5w1s": "Lee et al. 2019 (ridge head)",
    "reptile-omniglot-5w1s": "Nichol et al. 2018",
    "baseline-omniglot-5w1s": "Chen et al. 2019",
    "protonet-omniglot-lake": "Lake et al. 2015 protocol",
    "protonet-omniglot-small1": "Lake et al. 2015 protocol",
    "protonet-omniglot-small2": "Lake et al. 2015 protocol",
    "maml-omniglot-lake": "Lake et al. 2015 protocol",
}
PRESETS: dict[str, dict[str, Any]] = {
    "maml-sinusoid": {**_SINUSOID},
    # Finn et al.: pretrained on all tasks, fine-tuned by SGD (their step size was tuned; 0.01 here)
    "baseline-sinusoid": {**_SINUSOID, "algorithm": "baseline"},
    "maml-omniglot-5w1s": {**_MAML_5W},
    "maml-omniglot-20w1s": {**_MAML_20W},
    "fomaml-omniglot-5w1s": {**_MAML_5W, "algorithm": "fomaml"},
    "fomaml-omniglot-20w1s": {**_MAML_20W, "algorithm": "fomaml"},
    "anil-omniglot-20w1s": {**_MAML_20W, "algorithm": "anil"},
    "mamlpp-omniglot-20w1s": {**_MAML_20W, "algorithm": "mamlpp", "iterations": 50000},
    "protonet-omniglot-5w1s": {**_PROTONET, "ways": 5},
    "protonet-omniglot-20w1s": {**_PROTONET, "ways": 20},
    # R2D2 and MetaOptNet on ProtoNets' episodes (their papers' Omniglot / CIFAR-FS setups train
    # with more ways than they test): 60-way training episodes, 5 queries, Adam 1e-3 halved
    "r2d2-omniglot-5w1s": {**_PROTONET, "algorithm": "r2d2", "ways": 5},
    "metaoptnet-omniglot-5w1s": {**_PROTONET, "algorithm": "metaoptnet", "ways": 5},
    "metaoptnet-rr-omniglot-5w1s": {**_PROTONET, "algorithm": "metaoptnet", "ways": 5,
                                    "head": "ridge"},
    # Nichol et al., Table 3 (Omniglot): 10 training shots, inner Adam 1e-3 x 5 steps, ε = 1
    # annealed to 0, meta-batch 5, 100k iterations, 50 steps at test, test classes unrotated.
    "reptile-omniglot-5w1s": {
        "algorithm": "reptile", "dataset": "omniglot", "ways": 5, "shots": 10, "queries": 1,
        "eval_shots": 1, "eval_queries": 1, "inner_optimizer": "adam", "inner_lr": 1e-3,
        "inner_steps": 5, "eval_inner_steps": 50, "report_steps": [0, 50], "anneal": True,
        "outer_lr": 1.0, "meta_batch": 5, "iterations": 100000, "rotate_test": False,
    },
    # Chen et al. style: pretrain conv4 on all 4,800 training classes (rotations included), then
    # fit a fresh linear head per task with Adam (100 steps), backbone frozen.
    "baseline-omniglot-5w1s": {
        **_OMNIGLOT_1S, "algorithm": "baseline", "ways": 5, "queries": 5, "eval_queries": 1,
        "batch_size": 128, "inner_steps": 100, "eval_inner_steps": 100,
        "report_steps": [0, 100], "iterations": 20000,
    },
    # Lake et al.'s protocol: ProtoNets with affine stroke distortions, within-alphabet episodes
    "protonet-omniglot-lake": {**_PROTONET_LAKE},
    "protonet-omniglot-small1": {**_PROTONET_LAKE, "dataset": "omniglot-small1",
                                 "iterations": 20000, "halve_every": 4000},
    "protonet-omniglot-small2": {**_PROTONET_LAKE, "dataset": "omniglot-small2",
                                 "iterations": 20000, "halve_every": 4000},
    "maml-omniglot-lake": {**_MAML_20W, **_LAKE, "augment": "affine"},
}  # fmt: skip
