"""Fine-tune a torchvision ResNet-18 on each task, starting from weights in a local file.

``metafunc.from_module`` turns any ``nn.Module`` into a pure metafunc model (its batch norms
replaced by exact ones), ``head="fc"`` naming its classifier. As a stand-in for pretrained
weights, the script saves a randomly initialised ResNet-18's state dict to a temporary
``.safetensors`` file and loads the parameters back with ``metafunc.algorithms.load_weights``
(point it at real weights instead: a ``torch.save``d state dict loads the same way). Then, on
synthetic 5-way tasks of 3-channel images (each class a random pattern plus noise):

- ``MAML(..., trainable="fc").evaluate`` fine-tunes the head on every task's support set and
  reports the query accuracy after each step, with no outer graph;
- a few first-order meta-iterations (``meta_grad``, Adam) train the whole network so that
  fine-tuning the head works better.

    python examples/resnet_finetune.py          # 8 tasks of 32x32 images, 5 steps
    python examples/resnet_finetune.py --tiny   # 2 tasks of 16x16 images, 1 step
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

import metafunc as mf
from metafunc.algorithms import MAML, load_weights

WAYS = 5


def synthetic_tasks(tasks: int, size: int, shots: int, queries: int, gen: torch.Generator):
    """5-way tasks whose classes are random 3-channel patterns, each example one plus noise."""
    patterns = torch.randn(tasks, WAYS, 1, 3, size, size, generator=gen)

    def examples(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = patterns + 0.8 * torch.randn(tasks, WAYS, k, 3, size, size, generator=gen)
        return x.flatten(1, 2), torch.arange(WAYS).repeat_interleave(k).repeat(tasks, 1)

    return mf.TaskBatch(*examples(shots), *examples(queries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 small tasks, 1 step")
    args = parser.parse_args()
    tasks, size, steps, iterations = (2, 16, 1, 1) if args.tiny else (8, 32, 5, 10)
    torch.manual_seed(0)  # torchvision initialises from the global generator

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet18.safetensors"
        save_file(torchvision.models.resnet18(num_classes=WAYS).state_dict(), str(path))
        model = mf.from_module(torchvision.models.resnet18(num_classes=WAYS), head="fc")
        meta = {"params": load_weights(path, like=model.init())}  # the file's parameters
    print(f"loaded {len(meta['params'])} tensors from {path.name}")

    alg = MAML(model, inner_lr=0.1, inner_steps=steps, trainable="fc", first_order=True)
    gen = torch.Generator().manual_seed(1)
    test = synthetic_tasks(tasks, size, shots=1, queries=5, gen=gen)
    acc = alg.evaluate(meta, test, steps)["accuracy"].mean(0)
    print(f"query accuracy before fine-tuning {acc[0]:.2f}, after {steps} step(s) {acc[-1]:.2f}")

    opt = alg.outer_optimizer(1e-3, iterations)
    state = opt.init(meta)
    for it in range(iterations):
        batch = synthetic_tasks(tasks, size, shots=1, queries=5, gen=gen)
        grads, loss, metrics = alg.meta_grad(meta, batch)
        updates, state = opt.update(grads, state, meta)
        meta = mf.optim.apply_updates(meta, updates)
        print(f"meta-iteration {it}: query loss {loss:.3f}, accuracy {metrics['accuracy']:.2f}")
    acc = alg.evaluate(meta, test, steps)["accuracy"].mean(0)
    print(f"after meta-training: query accuracy {acc[0]:.2f} before, {acc[-1]:.2f} after")


if __name__ == "__main__":
    main()
