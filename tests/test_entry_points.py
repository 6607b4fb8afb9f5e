"""Every public entry point that takes tasks refuses a malformed batch, under every strategy, with
one metafunc error naming the call, the field and the fix; none is accepted silently."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metafunc as mf
from metafunc import TaskBatch
from metafunc.algorithms import (
    ANIL,
    IMAML,
    MAML,
    Baseline,
    FirstOrderMAML,
    MAMLPlusPlus,
    MetaSGD,
    ProtoNet,
    Reptile,
)

STRATEGIES = ["vmap", "chunked", "loop", "threads", "auto"]
WAYS, TASKS = 3, 4


def good_batch(gen: torch.Generator, tasks: int = TASKS) -> TaskBatch:
    x = torch.randn(tasks, WAYS, 1, 28, 28, generator=gen, dtype=torch.float64)
    q = torch.randn(tasks, 2 * WAYS, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(WAYS).expand(tasks, -1).clone()
    return TaskBatch(x, y, q, torch.arange(WAYS).repeat(2).expand(tasks, -1).clone())


def malformed(gen: torch.Generator) -> dict[str, tuple[TaskBatch, str, str]]:
    """``case: (batch, field named in the message, a word of the fix)``."""
    b = good_batch(gen)
    other = good_batch(gen, TASKS + 1)
    return {
        "float labels": (
            b._replace(support_y=b.support_y.double(), query_y=b.query_y.double()),
            "support_y",
            ".long()",
        ),
        "int32 labels": (
            b._replace(support_y=b.support_y.int(), query_y=b.query_y.int()),
            "support_y",
            ".long()",
        ),
        "labels 1..ways": (
            b._replace(support_y=b.support_y + 1, query_y=b.query_y + 1),
            "support_y",
            "relabel",
        ),
        "more query tasks": (
            b._replace(query_x=other.query_x, query_y=other.query_y),
            "query_x",
            "same leading task axis",
        ),
        "no task axis": (TaskBatch(*(f[0] for f in b)), "support_y", "f[None]"),
        "query examples of another shape": (
            b._replace(query_x=b.query_x[..., :14]),
            "query_x",
            "must agree",
        ),
        "more labels than inputs": (
            b._replace(support_y=torch.arange(WAYS + 1).expand(TASKS, -1).clone()),
            "support_y",
            "one target",
        ),
    }


# which malformed batches an entry point can tell from the batch alone: task_map and adapt take
# any per-task function, so they cannot know that float targets were meant as class labels or
# how many classes there are (an algorithm knows both from its loss and its model)
LOSS_AWARE = {"float labels", "labels 1..ways"}


def check_message(error: BaseException, call: str, field: str, fix: str) -> None:
    message = str(error)
    assert message.startswith(call), message
    assert field in message, message
    assert fix in message, message
    for torch_text in ("vmap:", "gather()", "Expected", "out of bounds", "Traceback"):
        assert torch_text not in message, message


ALGORITHMS: dict[str, Callable[[str], Any]] = {
    "MAML": lambda s: MAML(mf.conv4(WAYS, hidden=4), inner_lr=0.1, strategy=s, chunk_size=2),
    "ProtoNet": lambda s: ProtoNet(mf.conv4(None, hidden=4), shots=1, strategy=s, chunk_size=2),
    "Reptile": lambda s: Reptile(mf.conv4(WAYS, hidden=4), inner_steps=1, strategy=s, chunk_size=2),
}
ENTRY_POINTS: dict[str, Callable[[Any, Any, TaskBatch], Any]] = {
    "meta_grad": lambda alg, meta, b: alg.meta_grad(meta, b),
    "meta_loss": lambda alg, meta, b: alg.meta_loss(meta, b),
    "evaluate": lambda alg, meta, b: alg.evaluate(meta, b, 1),
    "adapt_and_predict": lambda alg, meta, b: alg.adapt_and_predict(meta, b, 1),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_algorithm_entry_points_refuse_every_malformed_batch(gen, strategy, algorithm, entry):
    alg = ALGORITHMS[algorithm](strategy)
    meta = alg.init(gen, dtype=torch.float64)
    ENTRY_POINTS[entry](alg, meta, good_batch(gen))  # the well-formed batch runs
    for case, (bad, field, fix) in malformed(gen).items():
        with pytest.raises((ValueError, TypeError)) as info:
            ENTRY_POINTS[entry](alg, meta, bad)
        check_message(info.value, f"{algorithm}.{entry}(meta_params, batch)", field, fix), case


def task_fn(meta: Any, task: TaskBatch) -> torch.Tensor:
    model = mf.conv4(WAYS, hidden=4)
    inner = mf.adapt(
        lambda p, t: F.cross_entropy(model.apply(p, t.support_x), t.support_y), mf.optim.sgd(0.1), 1
    )
    adapted, _ = inner(meta, task)
    return F.cross_entropy(model.apply(adapted, task.query_x), task.query_y)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_task_map_and_adapt_refuse_what_a_batch_alone_shows(gen, strategy):
    meta = mf.conv4(WAYS, hidden=4).init(gen, dtype=torch.float64)
    mapped = mf.task_map(task_fn, strategy=strategy, chunk_size=2)
    mapped(meta, good_batch(gen))
    for case, (bad, field, fix) in malformed(gen).items():
        with pytest.raises((ValueError, TypeError, RuntimeError, IndexError)) as info:
            mapped(meta, bad)  # loss-aware cases: torch's own error, still never silent
        if case not in LOSS_AWARE:
            check_message(info.value, f"task_map(fn, strategy={strategy!r})", field, fix)
        task = TaskBatch(*(f[0] for f in bad)) if case != "no task axis" else bad
        if case in LOSS_AWARE | {"no task axis", "more query tasks"}:
            continue  # one task: no task axis to check
        with pytest.raises((ValueError, TypeError)) as info:
            task_fn(meta, task)
        check_message(info.value, "adapt(...)(params, batch)", field, fix)


def test_silently_dropped_query_tasks_regression():
    """The issue's repro: under 'loop' a query set with more tasks than the support set was
    accepted and its extra task ignored."""
    tasks = mf.data.get_benchmark("sinusoid", shots=5).train
    b4 = tasks.sample(4, torch.Generator().manual_seed(1))
    b5 = tasks.sample(5, torch.Generator().manual_seed(2))
    bad = b4._replace(query_x=b5.query_x, query_y=b5.query_y)
    for strategy in STRATEGIES:
        alg = MAML(mf.mlp(), inner_lr=0.01, inner_steps=2, loss="mse", strategy=strategy,
                   chunk_size=2)  # fmt: skip
        with pytest.raises(ValueError, match=re.escape("batch.query_x 5")):
            alg.meta_grad(alg.init(), bad)


def test_regression_needs_floating_targets(gen):
    b = mf.data.get_benchmark("sinusoid", shots=5).train.sample(4, gen)
    alg = MAML(mf.mlp(), loss="mse")
    with pytest.raises(TypeError, match=r"MAML\.meta_grad\(meta_params, batch\): batch\.support_y "
                       r"is torch\.int64, but a regression loss"):  # fmt: skip
        alg.meta_grad(
            alg.init(), b._replace(support_y=b.support_y.long(), query_y=b.query_y.long())
        )


def test_a_batch_that_is_not_a_taskbatch(gen):
    alg = MAML(mf.mlp(), loss="mse")
    b = mf.data.get_benchmark("sinusoid", shots=5).train.sample(4, gen)
    with pytest.raises(TypeError, match=r"batch is a tuple, not a metafunc\.TaskBatch"):
        alg.meta_grad(alg.init(), tuple(b))
    with pytest.raises(TypeError, match=r"batch\.query_y is a list"):
        alg.meta_loss(alg.init(), b._replace(query_y=[1.0]))


def test_labels_are_checked_under_the_compiled_meta_grad_too(gen):
    alg = MAML(mf.conv4(WAYS, hidden=4), strategy="loop")
    bad = malformed(gen)["labels 1..ways"][0]
    with pytest.raises(ValueError, match="relabel"):
        alg.compiled_meta_grad(backend="aot_eager")(alg.init(gen, dtype=torch.float64), bad)


ALL_ALGORITHMS: dict[str, Callable[[Any], Any]] = {
    "MAML": MAML,
    "FirstOrderMAML": FirstOrderMAML,
    "MetaSGD": MetaSGD,
    "ANIL": ANIL,
    "MAMLPlusPlus": MAMLPlusPlus,
    "Reptile": Reptile,
    "IMAML": IMAML,
    "ProtoNet": lambda m: ProtoNet(m, shots=1),
    "Baseline": Baseline,
}


@pytest.mark.parametrize("name", list(ALL_ALGORITHMS))
def test_constructors_refuse_a_module_and_name_from_module(name):
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"\(model\): got a torch\.nn\.Module \(Sequential\).*"
                       r"metafunc\.from_module\(module\)"):  # fmt: skip
        ALL_ALGORITHMS[name](module)
    with pytest.raises(TypeError, match=r"\(model\): got a str; pass a metafunc\.Model"):
        ALL_ALGORITHMS[name]("conv4")


def test_constructors_name_a_wrong_loss_and_randomness():
    with pytest.raises(ValueError, match=r"MAML\(loss\): 'nll' is not one of .*'mse' for"):
        MAML(mf.mlp(), loss="nll")
    with pytest.raises(ValueError, match=r"Reptile\(randomness\): randomness='fixed' is not one"):
        Reptile(mf.mlp(), loss="mse", randomness="fixed")


def test_the_readme_algorithm_gets_the_checks(gen):
    """A user's own subclass (the README's CAVIA shape) gets the model check and the batch
    check at its own meta_loss and adapt_and_predict without writing either."""
    from dataclasses import dataclass

    from metafunc.algorithms import Algorithm

    @dataclass(frozen=True)
    class Mine(Algorithm):
        model: mf.Model
        loss: str = "mse"

        def adapt_and_predict(self, meta, batch, steps):
            return mf.task_map(lambda m, t: self.model.apply(m["params"], t.query_x)[None])(
                meta, batch
            )

        def meta_loss(self, meta, batch, *, iteration=0):
            loss = F.mse_loss(self.adapt_and_predict(meta, batch, 0)[:, 0], batch.query_y)
            return loss, {"loss": loss.detach()}

    with pytest.raises(TypeError, match="from_module"):
        Mine(nn.Linear(1, 1))  # type: ignore[arg-type]
    alg = Mine(mf.mlp())
    b = mf.data.get_benchmark("sinusoid", shots=5).train.sample(4, gen)
    alg.meta_grad(alg.init(), b)
    for entry in ("meta_loss", "adapt_and_predict", "meta_grad", "evaluate"):
        bad = b._replace(query_x=b.query_x[:3])
        with pytest.raises(ValueError, match=rf"^Mine\.{entry}\(meta_params, batch\): the fields"):
            ENTRY_POINTS[entry](alg, alg.init(), bad)


def test_public_namespace_is_the_api():
    assert sorted(dir(mf)) == sorted(mf.__all__)
    for name in ("Any", "annotations", "importlib"):
        assert name not in dir(mf)
    for name in mf.__all__:
        assert getattr(mf, name) is not None
