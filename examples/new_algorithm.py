"""A new algorithm from metafunc's parts: MAML with one learned inner learning rate per layer.

Meta-SGD learns a rate per parameter *entry*; here every parameter tensor gets one 0-d rate,
meta-learned with the weights through the inner loop (second order). Written as an
``Algorithm`` subclass, it needs only ``init``, ``meta_loss`` and ``adapt_and_predict``: the inner
loop is ``metafunc.adapt`` with ``sgd(rate_tree)``, tasks go through ``map_tasks``
(``metafunc.task_map`` with the algorithm's strategy), and the base class supplies
``meta_grad``, ``evaluate`` and ``outer_optimizer``. Trained on MAML's
sinusoid tasks, it prints the query MSE before and after adaptation.

    python examples/new_algorithm.py            # 1000 meta-iterations, a few seconds
    python examples/new_algorithm.py --tiny     # 20
"""

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import metafunc as mf
from metafunc.algorithms import Algorithm


@dataclass(frozen=True)
class LayerLR(Algorithm):
    """MAML whose inner SGD step uses one meta-learned rate per parameter tensor."""

    inner_lr: float = 0.01  # every layer's rate at initialisation
    inner_steps: int = 1
    loss: str = "mse"

    def init(self, generator=None, *, dtype=torch.float32, device=None):
        params = self.model.init(generator, dtype=dtype, device=device)
        rates = {k: torch.tensor(self.inner_lr, dtype=dtype, device=device) for k in params}
        return {"params": params, "lr": rates}  # both meta-learned

    def adapt_and_predict(self, meta, batch, steps):  # [tasks, steps + 1, query, 1]
        def support_loss(params, task):
            return F.mse_loss(self.model.apply(params, task.support_x), task.support_y)

        def predict(params, task):
            return self.model.apply(params, task.query_x)

        inner = mf.adapt(support_loss, mf.optim.sgd(meta["lr"]), steps, observe=predict)
        return self.map_tasks(lambda m, task: inner(m["params"], task)[1]["observed"])(meta, batch)

    def meta_loss(self, meta, batch, *, iteration=0):
        preds = self.adapt_and_predict(meta, batch, self.inner_steps)[:, -1]
        loss = F.mse_loss(preds, batch.query_y)
        return loss, {"loss": loss.detach()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="20 iterations, for a smoke test")
    args = parser.parse_args()
    iterations, meta_batch = (20, 5) if args.tiny else (1000, 25)

    alg = LayerLR(mf.mlp((1, 40, 40, 1)), inner_lr=0.05, inner_steps=1)
    meta = alg.init(torch.Generator().manual_seed(0))
    tasks, gen = mf.data.SinusoidTasks(shots=10), torch.Generator().manual_seed(1)
    opt = alg.outer_optimizer(3e-3, iterations)
    state = opt.init(meta)
    for it in range(iterations):
        grads, loss, _ = alg.meta_grad(meta, tasks.sample(meta_batch, gen))
        updates, state = opt.update(grads, state, meta)
        meta = mf.optim.apply_updates(meta, updates)
        if it % (iterations // 4) == 0:
            print(f"iteration {it}: meta-loss {float(loss):.3f}")

    test = tasks.sample(100, torch.Generator().manual_seed(2))
    mse = alg.evaluate(meta, test, steps=alg.inner_steps)["loss"].mean(0)  # after 0, 1 steps
    print("learned rates:", ", ".join(f"{k} {float(v):.3f}" for k, v in meta["lr"].items()))
    print(f"query MSE before adaptation {mse[0]:.3f}, after adaptation {mse[-1]:.3f}")


if __name__ == "__main__":
    main()
