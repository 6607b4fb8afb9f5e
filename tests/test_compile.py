"""``Algorithm.compiled_meta_grad`` (``torch.compile`` of the whole meta-gradient): the same
gradients as the independent per-task reference and as eager ``meta_grad`` in float64, the
harness option, and clear refusals. Each compile takes 10-40 s on the 2-core CPU."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LR, sine_mlp, sine_tasks
from references import ref_meta_grad

from metafunc import TaskBatch, compile_step, conv4, optim, tree
from metafunc.algorithms import IMAML, MAML, MetaOptNet, MetaSGD, Reptile
from metafunc.cli import main
from metafunc.harness import Config, ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean slate: the tests compile the same functions in many
    variants, which in one process would add up to dynamo's recompile limit (8 per function)."""
    torch._dynamo.reset()
    yield


def rel(a, b) -> float:
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


def test_compiled_maml_matches_the_per_task_reference_through_batch_norm(gen):
    tasks, ways, shots = 2, 3, 2
    x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    q = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    batch = TaskBatch(x, y, q, y)
    alg = MAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=2, strategy="loop")
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(meta, batch, 2, lr=lambda leaves, k, n: LR)
    grads, loss, metrics = alg.compiled_meta_grad(backend="aot_eager")(meta, batch)
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8
    _, eager_loss, _ = alg.meta_grad(meta, batch)
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-12)
    assert 0 <= float(metrics["accuracy"]) <= 1


def test_compiled_loop_runs_one_task_graph_for_any_meta_batch(gen):
    """On the loop strategy the compiled graph covers one task: a meta-batch of 5 runs it five
    times (one compile, not one per task) and averages to the per-task reference; a changing
    iteration does not recompile at every step."""
    from torch._dynamo.utils import counters

    tasks, ways, shots = 5, 2, 1
    x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    q = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    batch = TaskBatch(x, y, q, y)
    alg = MAML(conv4(ways, hidden=4), inner_lr=LR, inner_steps=1, strategy="loop")
    meta = alg.init(gen, dtype=torch.float64)
    assert alg.tasks_per_graph(batch, torch.device("cpu")) == 1
    torch._dynamo.reset()
    counters.clear()
    compiled = alg.compiled_meta_grad(backend="aot_eager")
    grads, loss, metrics = compiled(meta, batch)
    assert counters["stats"]["unique_graphs"] == 1
    for iteration in (1, 2, 3):  # the harness passes the step: one recompile makes it dynamic
        compiled(meta, batch, iteration=iteration)
    assert counters["stats"]["unique_graphs"] <= 2
    ref = ref_meta_grad(meta, batch, 1, lr=lambda leaves, k, n: LR)
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8
    _, eager_loss, eager_metrics = alg.meta_grad(meta, batch)
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-12)
    assert float(metrics["accuracy"]) == pytest.approx(float(eager_metrics["accuracy"]))
    chunked = MAML(conv4(ways, hidden=4), inner_lr=LR, inner_steps=1, strategy="chunked",
                   chunk_size=2)  # fmt: skip
    assert chunked.tasks_per_graph(batch, torch.device("cpu")) == 2  # pieces of 2, 2 and 1
    grads, _, _ = chunked.compiled_meta_grad(backend="aot_eager")(meta, batch)
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8


@pytest.mark.parametrize("strategy", ["auto", "threads"])
def test_compiled_per_task_strategies_with_intra_op_threads(gen, intra_op_threads, strategy):
    """The CPU's per-task strategies compile ('auto': the loop; 'threads', which runs tasks on
    threads when torch has several): the traced graph is one task's and the pieces run in turn,
    on the calling thread, with the reference gradients."""
    tasks, ways, shots = 3, 2, 1
    x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    q = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    batch = TaskBatch(x, y, q, y)
    alg = MAML(conv4(ways, hidden=4), inner_lr=LR, inner_steps=1, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    with intra_op_threads(2):
        grads, loss, _ = alg.compiled_meta_grad(backend="aot_eager")(meta, batch)
        _, eager_loss, _ = alg.meta_grad(meta, batch)
    ref = ref_meta_grad(meta, batch, 1, lr=lambda leaves, k, n: LR)
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8
    assert float(loss) == pytest.approx(float(eager_loss), rel=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MetaSGD(sine_mlp(), inner_lr=0.02, inner_steps=2, loss="mse", strategy="vmap"),
        lambda: Reptile(sine_mlp(), inner_lr=0.02, inner_steps=3, loss="mse", strategy="loop"),
    ],
    ids=["metasgd-vmap", "reptile-loop"],
)
def test_compiled_meta_grad_equals_eager(make):
    alg = make()
    gen = torch.Generator().manual_seed(0)
    meta = tree.map(lambda x: x.double(), alg.init(gen))
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    compiled = alg.compiled_meta_grad(backend="aot_eager")
    for _ in range(2):  # the second call reuses the compiled graph
        grads, loss, _ = compiled(meta, batch)
        ref, ref_loss, _ = alg.meta_grad(meta, batch)
        assert rel(grads, ref) <= 1e-10
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
        batch = sine_tasks(gen, 3, dtype=torch.float64)


def test_compiled_meta_grad_refuses_what_it_cannot_trace():
    with pytest.raises(ValueError, match=r"compiled_meta_grad\(mode\): mode='fast'"):
        MAML(sine_mlp(), loss="mse").compiled_meta_grad("fast")
    with pytest.raises(ValueError, match="checkpoint=False to compile"):
        MAML(sine_mlp(), loss="mse", checkpoint=True).compiled_meta_grad()
    with pytest.raises(ValueError, match=r"IMAML cannot be compiled whole \(custom_root's"):
        IMAML(sine_mlp(), loss="mse").compiled_meta_grad()
    with pytest.raises(ValueError, match=r"MetaOptNet cannot be compiled whole yet \(custom_root"):
        compile_step(MetaOptNet(conv4(None), shots=1), optim.adam(1e-3))
    assert not MetaOptNet(conv4(None), shots=1, head="ridge").not_compilable()
    alg = MAML(sine_mlp(), loss="mse")
    bad = {"params": {**alg.init()["params"], "fc0.bias": None}}
    with pytest.raises(TypeError, match=r"compiled_meta_grad\(\)\(meta_params, batch\)"):
        alg.compiled_meta_grad()(bad, sine_tasks(torch.Generator(), 2))


def test_config_refuses_compile_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="compile='fast' is not one of"):
        Config(compile="fast")
    for bad, why in (
        ({"algorithm": "baseline", "dataset": "omniglot"}, "pretrains a classifier"),
        ({"inner_checkpoint": True}, "Python sweep"),
        ({"precision": "bf16"}, "autocast runs eagerly"),
        ({"algorithm": "imaml"}, "custom_root"),
        ({"algorithm": "metaoptnet", "dataset": "omniglot"}, "custom_root"),
    ):
        with pytest.raises(ConfigError, match=why):
            Config(compile="default", **bad)
        assert Config(compile="auto", **bad).compile_unavailable()  # auto then runs eagerly
    mamlpp = {"algorithm": "mamlpp", "eval_inner_steps": 1, "report_steps": (0, 1)}
    assert Config(compile="default", **mamlpp).compile == "default"  # compiles now
    assert Config.from_dict({"compile": None}).compile == "off"  # a config from before 'auto'


def test_train_with_compile_follows_the_eager_run(tmp_path):
    common = ["--iterations", "4", "--meta-batch", "3", "--eval-episodes", "4", "--quiet",
              "--dtype", "float64", "--log-every", "1", "--eval-inner-steps", "1",
              "--report-steps", "0", "1"]  # fmt: skip
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "default"])):
        runs[name] = tmp_path / name
        assert main(["train", "--run-dir", str(runs[name]), *common, *extra]) == 0
    losses = {}
    for name, run in runs.items():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-9)
    config = json.loads((runs["compiled"] / "config.json").read_text())
    assert config["compile"] == "default"
