"""The algorithms on the device they run on: each meta-gradient against the same independent
float64 references as the CPU tests (an explicit per-task ``torch.autograd.grad`` loop, a dense
implicit solve, a sequential Reptile), for the strategies a GPU runs (``'auto'``, which is
``vmap`` on CUDA, ``'chunked'`` and ``'loop'``), with the data already on the device; then the
compiled meta-gradient and a short training run on CUDA.

Every comparison runs on the CPU too, where it is quick, so each test's own logic is checked on
every machine (the ``device`` fixture of ``conftest.py``); the CUDA cases are marked ``gpu`` and
skipped without CUDA (``pytest -m gpu`` on a lent GPU runs them: ``benchmarks/gpu.sh``).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LR, class_tasks, distinct_rates, to
from helpers import sine_tasks as sine_tasks_cpu
from references import (
    mamlpp_case,
    ref_imaml_grad,
    ref_meta_grad,
    ref_protonet_loss,
    ref_reptile_params,
)

from metafunc import TaskBatch, conv4, mlp, optim, tree
from metafunc.algorithms import (
    ANIL,
    IMAML,
    MAML,
    FirstOrderMAML,
    MAMLPlusPlus,
    MetaSGD,
    ProtoNet,
    Reptile,
)

STRATEGIES = ["auto", "chunked", "loop"]


def rel(a, b) -> float:  # type: ignore[no-untyped-def]
    """Relative global error of tree ``a`` (any device) against the CPU tree ``b``."""
    a = to("cpu", a)
    assert tree.structure(a) == tree.structure(b)
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


@pytest.fixture
def images(gen) -> TaskBatch:  # type: ignore[no-untyped-def]
    """3 tasks, 3-way 2-shot, 2 queries per class, 28x28 grey images, float64, on the CPU."""
    return class_tasks(gen, tasks=3, ways=3, shots=2, queries=2, shuffle=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil"])
def test_maml_family_matches_the_per_task_reference(gen, images, device, strategy, name):
    """MAML (second order through batch norm), first-order MAML, Meta-SGD with distinct
    per-entry rates and ANIL, each computed on ``device`` from data already there."""
    cls = {"maml": MAML, "fomaml": FirstOrderMAML, "metasgd": MetaSGD, "anil": ANIL}[name]
    steps = 2
    chunk = {"chunk_size": 2} if strategy == "chunked" else {}  # pieces of 2 and 1 tasks
    alg = cls(conv4(3, hidden=6), inner_lr=LR, inner_steps=steps, strategy=strategy, **chunk)
    meta = alg.init(gen, dtype=torch.float64)
    lr = lambda leaves, k, n: LR  # noqa: E731
    keys = None
    if name == "metasgd":
        meta["lr"] = distinct_rates(meta["lr"], gen)
        lr = lambda leaves, k, n: leaves[f"lr.{n}"]  # noqa: E731
    if name == "anil":
        keys = ["head.weight", "head.bias"]
    ref = ref_meta_grad(
        meta, images, steps, lr=lr, adapt_keys=keys, first_order=name == "fomaml"
    )  # on the CPU: the reference never moves
    grads, loss, metrics = alg.meta_grad(to(device, meta), to(device, images))
    assert loss.device.type == device and next(iter(tree.leaves(grads))).device.type == device
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8
    assert 0 <= float(metrics["accuracy"]) <= 1


def test_maml_plus_plus_matches_the_reference_with_per_step_batch_norm(gen, images, device):
    iteration = 20
    alg = MAMLPlusPlus(conv4(3, hidden=6), inner_lr=LR, inner_steps=3, msl_iterations=100)
    meta, ref = mamlpp_case(alg, gen, images, iteration)
    grads, _, _ = alg.meta_grad(to(device, meta), to(device, images), iteration=iteration)
    assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8


@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_imaml_matches_the_dense_implicit_solve(gen, device, strategy):
    alg = IMAML(
        mlp((1, 4, 1), activation="tanh", init="xavier"), lam=1.0, inner_lr=0.05,
        inner_steps=20, cg_steps=40, loss="mse", strategy=strategy,
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks_cpu(gen, 3, dtype=torch.float64)
    ref, _ = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20)
    grads, _, _ = alg.meta_grad(to(device, meta), to(device, batch))
    assert rel(grads["params"], ref) <= 1e-6


def test_reptile_matches_the_sequential_reference(gen, device):
    alg = Reptile(
        mlp((1, 8, 8, 1), activation="tanh", init="xavier"), inner_lr=0.05, inner_steps=4,
        loss="mse",
    )  # fmt: skip
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks_cpu(gen, 3, dtype=torch.float64)
    grads, _, _ = alg.meta_grad(to(device, meta), to(device, batch))
    opt = alg.outer_optimizer(0.7, 100)
    updates, _ = opt.update(grads, opt.init(to(device, meta)), to(device, meta))
    new = to("cpu", optim.apply_updates(to(device, meta), updates)["params"])
    ref = ref_reptile_params(meta["params"], batch, 0.05, 4, 0.7, "sgd")
    assert max(float((new[k] - ref[k]).abs().max()) for k in ref) <= 1e-10


def test_protonet_matches_the_per_task_reference(gen, device):
    alg = ProtoNet(conv4(None, hidden=8), shots=2)
    meta = alg.init(gen, dtype=torch.float64)
    batch = class_tasks(gen, tasks=3, ways=3, shots=2, queries=2)
    leaves = {k: v.clone().requires_grad_() for k, v in meta["params"].items()}
    ref_loss = ref_protonet_loss(leaves, batch, ways=3)
    ref = dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values())), strict=True))
    grads, loss, _ = alg.meta_grad(to(device, meta), to(device, batch))
    assert abs(float(loss) - float(ref_loss.detach())) <= 1e-12
    assert rel(grads["params"], ref) <= 1e-10


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_maml_on_cuda_matches_the_reference(gen, images, mode):
    """The whole meta-gradient compiled by inductor on CUDA (``'reduce-overhead'``: with CUDA
    graphs), second order through batch norm, against the per-task reference."""
    from torch._dynamo.utils import counters

    alg = MAML(conv4(3, hidden=6), inner_lr=LR, inner_steps=2)
    meta = alg.init(gen, dtype=torch.float64)
    ref = ref_meta_grad(meta, images, 2, lr=lambda leaves, k, n: LR)
    compiled = alg.compiled_meta_grad(mode)
    counters.clear()
    for _ in range(3):  # reduce-overhead: a warm-up, a recording, then a replay of the graph
        grads, _, _ = compiled(to("cuda", meta), to("cuda", images))
        assert rel(tree.flatten_with_paths(grads), ref) <= 1e-8
    if mode == "reduce-overhead":  # CUDA graphs were used, not skipped for some reason
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_short_omniglot_shaped_run_trains_on_cuda(tmp_path, precision):
    """`metafunc train --device cuda` end to end on the sinusoid (no data needed), and a meta-
    gradient of conv4 under each reduced precision stays close to float32's."""
    from metafunc.cli import main

    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--device", "cuda", "--iterations", "4"]
    args += ["--meta-batch", "4", "--eval-episodes", "4", "--eval-batch", "4", "--quiet"]
    assert main(args) == 0
    assert json.loads((run / "config.json").read_text())["device"] == "cuda"
    gen = torch.Generator().manual_seed(0)
    batch = to("cuda", class_tasks(gen, tasks=4, ways=5, shots=1, queries=3, dtype=torch.float32))
    alg = MAML(conv4(5, hidden=32), inner_lr=LR, inner_steps=1)
    meta = to("cuda", alg.init(gen))
    conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
    saved = torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision

    def meta_grad(fp32: str):  # type: ignore[no-untyped-def]
        torch.backends.cuda.matmul.fp32_precision = conv.fp32_precision = fp32
        try:
            return alg.meta_grad(meta, batch)[0]
        finally:
            torch.backends.cuda.matmul.fp32_precision, conv.fp32_precision = saved

    exact = meta_grad("ieee")  # cuDNN's own default runs float32 convolutions in TF32
    if precision == "tf32":
        reduced = meta_grad("tf32")
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            reduced = meta_grad("ieee")
    err = float(tree.global_norm(tree.sub(reduced, exact)) / tree.global_norm(exact))
    assert err < 0.5, err  # a reduced precision, not a different gradient
