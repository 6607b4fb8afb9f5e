"""The small tasks, models and probes the algorithm tests (and ``test_gpu.py``,
``test_compile.py``) run on; the references they check against are in ``references.py``.

Not a test module: pytest collects nothing here, and test modules import from it rather than
from each other."""

from __future__ import annotations

import math

import torch

from metafunc import TaskBatch, mlp, tree
from metafunc.algorithms import shared_step
from metafunc.algorithms.shared_step import shares_first_step

LR = 0.3

# MAML can share the first inner step across tasks on the per-task strategies
# (shared_first_step; by default only under 'threads'); both ways are checked against the reference
PER_TASK = [("loop", True), ("loop", False), ("vmap", True), ("threads", True), ("threads", False)]


def to(device, x):
    """A tree (or TaskBatch) with every tensor moved to ``device``."""
    if isinstance(x, TaskBatch):
        return TaskBatch(*(t.to(device) for t in x))
    return tree.map(lambda t: t.to(device), x)


def under_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap...) is active, read from torch's own
    interpreter stack."""
    return bool(torch._C._functorch.get_interpreter_stack())


def conv_batch(gen: torch.Generator) -> TaskBatch:
    """Three 3-way 2-shot tasks of random 28x28 float64 images (labels in order, query images
    distinct from the support ones): the meta-batch of the conv4 gradient tests."""
    tasks, ways, shots = 3, 3, 2
    x = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).clone()
    q = torch.randn(tasks, ways * shots, 1, 28, 28, generator=gen, dtype=torch.float64)
    return TaskBatch(x, y, q, y)


def takes_shared_path(alg, meta, batch, monkeypatch, expected):
    """Check that ``shares_first_step`` says ``expected`` for ``batch``, and record the batch of
    every call of MAML's shared-first-step path from then on: a test checks that
    ``alg.meta_grad(meta, batch)`` took the path (or did not) with that very ``batch``."""
    if not isinstance(batch, TaskBatch):  # the path reads its tasks: a stand-in proves nothing
        raise TypeError(f"takes_shared_path: batch is a {type(batch).__name__}, not a TaskBatch")
    calls = []
    original = shared_step.shared_first_step_grad

    def recorded(alg, meta_params, batch, iteration):
        calls.append(batch)
        return original(alg, meta_params, batch, iteration)

    monkeypatch.setattr(shared_step, "shared_first_step_grad", recorded)
    assert shares_first_step(alg, meta, batch) == expected
    return calls


def distinct_rates(rates, gen):
    """Meta-SGD's rates made distinct per entry, so a mix-up of leaves cannot pass."""
    return {
        k: v * (1 + 0.5 * torch.rand(v.shape, generator=gen, dtype=v.dtype))
        for k, v in rates.items()
    }


def sine_tasks(gen, tasks, support=10, query=10, dtype=torch.float32):
    """MAML's sinusoid tasks: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi],
    x ~ U[-5, 5]."""
    amp = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(tasks, 1, 1, dtype=dtype).uniform_(0.0, math.pi, generator=gen)
    x = torch.empty(tasks, support + query, 1, dtype=dtype).uniform_(-5.0, 5.0, generator=gen)
    y = amp * torch.sin(x - phase)
    return TaskBatch(x[:, :support], y[:, :support], x[:, support:], y[:, support:])


def class_tasks(gen, tasks, ways, shots, queries, size=28, dtype=torch.float64, shuffle=True):
    """Image tasks with labels 0..ways-1 (support labels shuffled, so nothing assumes order)."""

    def split(n):
        x = torch.randn(tasks, ways * n, 1, size, size, generator=gen, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(n).expand(tasks, -1).clone()
        if shuffle:
            y = torch.stack([row[torch.randperm(row.numel(), generator=gen)] for row in y])
        return x, y

    return TaskBatch(*split(shots), *split(queries))


def sine_mlp():
    """MAML's 1-40-40-1 ReLU network with Glorot weights. From the paper's std-0.01 normal
    init the output starts at ~0 and learning is slow: MAML in ``algorithms/test_training.py``
    reaches a post-adaptation MSE of 2.06 after 300 iterations from it, 0.52 from Glorot."""
    return mlp(init="xavier")
