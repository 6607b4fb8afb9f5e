"""metafunc: ``metafunc.MAML`` on ``metafunc.models.conv4``, tasks mapped by ``task_map``.

Registered as ``metafunc`` (the default strategy for the device: ``'auto'``), and
``metafunc-loop``, ``metafunc-threads``, ``metafunc-vmap``, ``metafunc-chunked`` (chunks of 8
tasks) to time each task-parallel strategy on the same work, and ``metafunc-checkpoint`` (the
default strategy with ``MAML(checkpoint=True)``: memory flat in the number of inner steps) and
``metafunc-compile`` (the default strategy, the meta-gradient compiled by
``MAML.compiled_meta_grad``, one task per graph on the CPU; the untimed warm-up iteration pays
for the compilation) and ``metafunc-compile-ro`` (the same in ``'reduce-overhead'`` mode: CUDA
graphs on CUDA, where the shapes are static). On the CPU every variant calls
``metafunc.tune_cpu_allocator()`` first, as ``metafunc train`` does, except
``metafunc-malloc-default`` (the default strategy with the C library's allocator settings, to
time what the tuning changes in the same run) and
``metafunc-unshared`` (the default strategy with ``MAML(shared_first_step=False)``: every task's
first inner step computed on its own, as before the tasks' shared first step was batched; the
other variants keep MAML's default, ``None``) and ``metafunc-reference`` (the default strategy
with ``conv4(kernels='reference')``: the plain layers). Every other variant opts in to
``conv4(kernels='cpu')`` (:mod:`metafunc.kernels`) on the CPU, as ``metafunc train`` does there,
and keeps the reference layers on other devices.
"""

from __future__ import annotations

from torch import Tensor

from benchmarks.peers.spec import Spec

DESCRIPTION = (
    "metafunc.MAML(conv4): torch.func.grad inner loop, tasks through metafunc.task_map with the "
    "named strategy (auto = loop for convolutional work on CPU, vmap on CUDA); meta-gradient by "
    "torch.func.grad"
)
STRATEGIES = {
    "metafunc": "auto",
    "metafunc-loop": "loop",
    "metafunc-threads": "threads",
    "metafunc-vmap": "vmap",
    "metafunc-chunked": "chunked",
    "metafunc-checkpoint": "auto",  # with gradient checkpointing across inner steps
    "metafunc-compile": "auto",  # with torch.compile of the whole meta-gradient
    "metafunc-compile-ro": "auto",  # the same, mode='reduce-overhead' (CUDA graphs)
    "metafunc-malloc-default": "auto",  # without tune_cpu_allocator
    "metafunc-unshared": "auto",  # MAML(shared_first_step=False): each task's first step alone
    "metafunc-reference": "auto",  # conv4(kernels='reference') on every device
}


def backward_style(spec: Spec) -> str:
    return "metafunc's own (the mean differentiated by pieces of tasks)"


def library_version() -> str:
    import metafunc

    return metafunc.__version__


class MetafuncPeer:
    def __init__(
        self, spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor], variant: str
    ) -> None:
        from metafunc import tune_cpu_allocator
        from metafunc.algorithms import MAML
        from metafunc.data import TaskBatch
        from metafunc.models import conv4

        # As `metafunc train` does (False where glibc's MALLOC_* variables are set: they win).
        tune = spec.device == "cpu" and variant != "metafunc-malloc-default"
        self.allocator_tuned = tune_cpu_allocator() if tune else False
        cpu_kernels = spec.device == "cpu" and variant != "metafunc-reference"

        model = conv4(
            spec.ways, in_channels=spec.channels, hidden=spec.hidden, pooling=spec.pooling,
            image_size=spec.image_size,
            kernels="cpu" if cpu_kernels else "reference",
        )  # fmt: skip
        self.alg = MAML(
            model, inner_lr=spec.inner_lr, inner_steps=spec.inner_steps,
            first_order=spec.first_order, strategy=STRATEGIES[variant],
            chunk_size=8 if variant == "metafunc-chunked" else None,
            checkpoint=variant == "metafunc-checkpoint",
            shared_first_step=False if variant == "metafunc-unshared" else None,
        )  # fmt: skip
        modes = {"metafunc-compile": "default", "metafunc-compile-ro": "reduce-overhead"}
        self.meta_grad = (
            self.alg.compiled_meta_grad(modes[variant]) if variant in modes else self.alg.meta_grad
        )
        self.params = {k: v.requires_grad_() for k, v in init.items()}
        self.batch = TaskBatch(
            data["support_x"], data["support_y"], data["query_x"], data["query_y"]
        )

    def forward_backward(self) -> Tensor:
        meta = {"params": {k: p.detach() for k, p in self.params.items()}}
        grads, loss, _ = self.meta_grad(meta, self.batch)
        for k, p in self.params.items():
            p.grad = grads["params"][k]
        return loss


def build(
    spec: Spec, init: dict[str, Tensor], data: dict[str, Tensor], variant: str = "metafunc"
) -> MetafuncPeer:
    return MetafuncPeer(spec, init, data, variant)
