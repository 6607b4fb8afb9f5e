"""The pretrain-then-fine-tune baseline (Chen et al., 2019; Tian et al., 2020), and MAML's
"pretrained on all tasks, then fine-tuned" regression baseline (Finn et al., 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from metafunc import tree as mt
from metafunc.algorithms._common import (
    INNER_OPTIMIZERS,
    class_one_hot,
    make_inner_optimizer,
    task_means,
    ways_of,
)
from metafunc.algorithms.base import Algorithm, gradient, loss_fn_of, task_metrics
from metafunc.algorithms.checks import check_choice, check_lr, check_steps, check_ways_shots
from metafunc.data.batch import TaskBatch
from metafunc.inner import adapt
from metafunc.models.base import default_generator, linear_init

__all__ = ["Baseline", "load_weights", "pretrain_batch"]

FINETUNE = ("head", "all")
HEAD_INIT = ("zeros", "prototypes")


def pretrain_batch(
    images: torch.Tensor, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain classification batch from class-indexed images ``[classes, examples, C, H, W]``:
    ``batch_size`` distinct examples drawn uniformly with ``generator``, and their global labels
    (the class index, ``int64``)."""
    call = "pretrain_batch(images, batch_size, generator)"
    if not isinstance(images, torch.Tensor) or images.dim() < 3:
        raise ValueError(f"{call}: images must be a tensor [classes, examples, ...].")
    classes, examples = images.shape[:2]
    if isinstance(batch_size, bool) or not 1 <= batch_size <= classes * examples:
        raise ValueError(
            f"{call}: batch_size must be an int in [1, {classes * examples}], got {batch_size!r}."
        )
    index = torch.randperm(classes * examples, generator=generator)[:batch_size]
    index = index.to(images.device)
    return images.flatten(0, 1)[index], index // examples


def load_weights(path: str | Path, like: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file or a ``torch.save``d state
    dict (read with ``weights_only=True``). With ``like`` (a params dict), exactly its entries,
    shape-checked and cast to its dtypes and devices; the file's other entries are ignored."""
    call = "load_weights(path, like)"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{call}: {str(path)!r} is not a file.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded: Any = load_file(str(path))
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise TypeError(
            f"{call}: {str(path)!r} does not hold a flat {{name: tensor}} state dict; save one "
            "with torch.save(module.state_dict(), path) or safetensors."
        )
    if like is None:
        return loaded
    missing = [k for k in like if k not in loaded]
    if missing:
        raise ValueError(
            f"{call}: the file has no entry for {missing[:5]} ({len(missing)} missing); its keys "
            f"start {list(loaded)[:5]}. Save the backbone's state_dict."
        )
    for k, v in like.items():
        if loaded[k].shape != v.shape:
            raise ValueError(
                f"{call}: {k!r} has shape {tuple(loaded[k].shape)} in the file but "
                f"{tuple(v.shape)} in the model."
            )
    return {k: loaded[k].to(dtype=v.dtype, device=v.device) for k, v in like.items()}


@dataclass(frozen=True)
class Baseline(Algorithm):
    """Pretrain a network with ordinary supervised learning, then fine-tune it on each task.

    Classification (``loss='cross_entropy'``, Chen et al. 2019; Tian et al. 2020): ``model`` is
    the backbone without a head (``conv4(None)``, ``resnet12(None)``, or a torchvision ResNet
    with ``fc = nn.Identity()`` through ``from_module``); its ``apply`` gives ``feature_dim``
    features. With ``num_train_classes``, ``meta_params = {'params': backbone, 'classifier':
    {'weight': [C, D], 'bias': [C]}}`` and :meth:`pretrain_loss` trains on plain batches with
    global labels (:func:`pretrain_batch`); :meth:`meta_loss` is not defined. Each new task gets
    a fresh linear head, ``head_init='zeros'`` or ``'prototypes'`` (``w_k = 2 c_k``,
    ``b_k = −||c_k||²``, the prototype classifier), trained with the backbone frozen
    (``finetune='head'``, the default) or with it (``'all'``).

    Regression (``loss='mse'``, MAML's sinusoid baseline): ``model`` is the whole network and
    ``meta_params = {'params': ...}``; :meth:`meta_loss` is the *un-adapted* model's loss on every
    point of the tasks (support ∪ query), so training on task batches is "pretraining on all
    tasks"; fine-tuning adapts every parameter (``finetune='all'``, the default) or ``model.head``.

    Fine-tuning takes ``inner_steps`` steps of ``inner_optimizer`` (``'sgd'`` with
    ``inner_momentum``, or ``'adam'``; default ``'adam'`` for classification, ``'sgd'`` for
    regression) on the support set, tasks batched by :func:`metafunc.task_map`. The number of
    ways of a task comes from ``shots`` (``support size / shots``) or ``ways``. Batch norm uses
    batch statistics throughout. ``init(..., weights=path)`` loads pretrained backbone weights.
    """

    num_train_classes: int | None = None
    feature_dim: int | None = None
    finetune: str | None = None
    inner_optimizer: str | None = None
    inner_lr: float = 0.01
    inner_steps: int = 100
    inner_momentum: float = 0.0
    head_init: str = "zeros"
    shots: int | None = None
    ways: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if callable(self.loss):
            raise ValueError(
                f"{name}(loss): the baseline pretrains a classifier or a regressor by the loss's "
                "name; pass 'cross_entropy' or 'mse'."
            )
        classify = self.loss == "cross_entropy"
        if self.finetune is None:
            object.__setattr__(self, "finetune", "head" if classify else "all")
        if self.inner_optimizer is None:
            object.__setattr__(self, "inner_optimizer", "adam" if classify else "sgd")
        check_choice(name, "finetune", self.finetune, FINETUNE)
        check_choice(name, "inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        check_choice(name, "head_init", self.head_init, HEAD_INIT)
        check_lr(name, "inner_lr", self.inner_lr)
        check_steps(name, "inner_steps", self.inner_steps)
        if not isinstance(self.inner_momentum, int | float) or not 0 <= self.inner_momentum < 1:
            raise ValueError(
                f"{name}(inner_momentum): must be in [0, 1), got {self.inner_momentum!r}."
            )
        if not classify:
            if self.num_train_classes is not None:
                raise ValueError(
                    f"{name}(num_train_classes): regression (loss='mse') pretrains on task "
                    "batches through meta_loss; drop num_train_classes."
                )
            if self.finetune == "head" and self.model.head is None:
                raise ValueError(f"{name}(finetune='head'): {self.model.name} has no head.")
            return
        if self.model.head is not None:
            raise ValueError(
                f"{name}(model): {self.model.name} ends in a head {self.model.head!r}; pass the "
                "backbone alone (conv4(None), resnet12(None)) and Baseline adds the classifier "
                "(num_train_classes) and a fresh head per task."
            )
        check_ways_shots(name, self.ways, self.shots)
        if self.num_train_classes is not None:
            check_steps(name, "num_train_classes", self.num_train_classes)
            if self.feature_dim is None:
                raise ValueError(
                    f"{name}(feature_dim): the pretraining classifier needs the backbone's "
                    "feature size, e.g. Baseline(conv4(None), num_train_classes=64, "
                    "feature_dim=64) (resnet12: 640, torchvision resnet18: 512)."
                )
            check_steps(name, "feature_dim", self.feature_dim)

    def init(
        self,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        weights: str | Path | None = None,
    ) -> dict[str, Any]:
        """``{'params': ...}`` (plus ``'classifier'`` with ``num_train_classes``). ``weights``:
        a file whose entries named like the parameters replace them (others are ignored)."""
        params = self.model.init(generator, dtype=dtype, device=device)
        if weights is not None:
            params = load_weights(weights, like=params)
        meta: dict[str, Any] = {"params": params}
        if self.num_train_classes is not None and self.feature_dim is not None:
            head = linear_init(
                default_generator(generator), self.num_train_classes, self.feature_dim
            )
            meta["classifier"] = {k: v.to(dtype=dtype, device=device) for k, v in head.items()}
        return meta

    # -- pretraining -------------------------------------------------------------------------

    def pretrain_loss(
        self, meta_params: Any, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy of the classifier over all ``num_train_classes`` on a plain batch."""
        if "classifier" not in meta_params:
            raise ValueError(
                f"{type(self).__name__}.pretrain_loss: meta_params has no 'classifier'; build "
                "the baseline with num_train_classes and feature_dim, then call init()."
            )
        c = meta_params["classifier"]
        logits = F.linear(self.model.apply(meta_params["params"], x), c["weight"], c["bias"])
        return F.cross_entropy(logits, y), task_metrics("cross_entropy", logits, y)

    def pretrain_grad(
        self, meta_params: Any, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        """``(grads of pretrain_loss, loss, metrics)`` (see :func:`gradient`)."""
        mt.validate(
            meta_params, call="Baseline.pretrain_grad(meta_params, x, y)", name="meta_params"
        )
        return gradient(lambda mp: self.pretrain_loss(mp, x, y), meta_params)

    def meta_loss(
        self, meta_params: Any, batch: TaskBatch, *, iteration: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Regression only: the un-adapted model's loss on support ∪ query of every task."""
        if self.loss != "mse":
            raise ValueError(
                f"{type(self).__name__}.meta_loss: the classification baseline pretrains on "
                "plain batches with global labels; use pretrain_loss(meta_params, x, y) with "
                "x, y = pretrain_batch(images, batch_size, generator)."
            )

        def one(mp: dict[str, Any], task: TaskBatch) -> tuple[torch.Tensor, Any]:
            x = torch.cat([task.support_x, task.query_x])
            y = torch.cat([task.support_y, task.query_y])
            preds = self.model.apply(mp["params"], x)
            return F.mse_loss(preds, y), task_metrics("mse", preds, y)

        losses, metrics = self.map_tasks(one)(meta_params, batch)
        return task_means(losses, metrics)

    # -- fine-tuning -------------------------------------------------------------------------

    def num_classes(self, meta_params: Any, batch: TaskBatch) -> int | None:
        """``ways``, or the support size over ``shots`` (classification)."""
        if self.loss != "cross_entropy":
            return None
        support = batch.support_x.shape[1]
        return ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, support)

    def _optimizer(self) -> Any:
        assert self.inner_optimizer is not None
        return make_inner_optimizer(
            self.inner_optimizer, self.inner_lr, momentum=self.inner_momentum
        )

    def _fresh_head(self, feats: torch.Tensor, task: TaskBatch) -> dict[str, torch.Tensor]:
        n = ways_of(f"{type(self).__name__}(shots, ways)", self.ways, self.shots, feats.shape[0])
        if self.head_init == "zeros":
            return {"weight": feats.new_zeros(n, feats.shape[1]), "bias": feats.new_zeros(n)}
        one_hot = class_one_hot(task.support_y, n, feats.dtype)
        protos = (one_hot.T @ feats) / one_hot.sum(0).clamp(min=1.0)[:, None]
        return {"weight": 2 * protos, "bias": -(protos**2).sum(-1)}

    def _finetune(self, mp: dict[str, Any], task: TaskBatch, steps: int) -> tuple[Any, Any]:
        """One task: ``(adapted tree, query predictions after 0..steps)``."""
        params, embed = mp["params"], self.model.apply
        data, trainable = task, None

        def linear(head: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
            return F.linear(f, head["weight"], head["bias"])

        if self.loss == "mse":
            start: dict[str, Any] = {"params": params}
            if self.finetune == "head":
                trainable = f"params.{self.model.head}"

            def predict(tree: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
                return embed(tree["params"], x)

        elif self.finetune == "head":  # features once; only the linear head trains
            fs = embed(params, task.support_x)
            data = TaskBatch(fs, task.support_y, embed(params, task.query_x), task.query_y)
            start, trainable = {"params": params, "head": self._fresh_head(fs, task)}, "head"

            def predict(tree: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
                return linear(tree["head"], x)

        else:
            start = {
                "params": params,
                "head": self._fresh_head(embed(params, task.support_x), task),
            }

            def predict(tree: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
                return linear(tree["head"], embed(tree["params"], x))

        lossf = loss_fn_of(self.loss)
        inner = adapt(
            lambda tree, t: lossf(predict(tree, t.support_x), t.support_y),
            self._optimizer(),
            steps,
            first_order=True,
            trainable=trainable,
            observe=lambda tree, t: predict(tree, t.query_x),
        )
        adapted, metrics = inner(start, data)
        return adapted, metrics["observed"]

    def adapted_params(self, meta_params: Any, batch: TaskBatch, steps: int | None = None) -> Any:
        """Every task's fine-tuned tree (``{'params', 'head'}``; regression ``{'params'}``)
        with a leading task axis, after ``steps`` (default ``inner_steps``) steps."""
        steps = self.inner_steps if steps is None else steps
        check_steps(f"{type(self).__name__}.adapted_params", "steps", steps, minimum=0)
        return self.map_tasks(lambda mp, t: self._finetune(mp, t, steps)[0])(meta_params, batch)

    def adapt_and_predict(self, meta_params: Any, batch: TaskBatch, steps: int) -> torch.Tensor:
        check_steps(f"{type(self).__name__}.adapt_and_predict", "steps", steps, minimum=0)
        return self.map_tasks(lambda mp, t: self._finetune(mp, t, steps)[1])(meta_params, batch)
