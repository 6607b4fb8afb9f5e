"""Your own meta-training loop, data-parallel with ``metafunc.distributed``.

Every rank draws the *whole* meta-batch from one seeded generator and keeps its share
(``split_batch``); ``meta_grad`` averages over its own tasks, ``all_reduce_mean`` weighted by
the task count turns that into the mean over all tasks, and every rank applies the same Adam
update, so the ranks stay identical (``assert_in_sync`` checks) and train on the tasks one
process would. Run as one process, every helper works without a process group (world size 1);
under ``torchrun`` the same script joins the group (gloo on CPUs, NCCL between GPUs):

    python examples/own_training_loop.py [--tiny]
    torchrun --standalone --nproc-per-node 2 examples/own_training_loop.py [--tiny]
"""

import argparse

import torch

import metafunc as mf
import metafunc.distributed as mfd
from metafunc.algorithms import MAML


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="10 iterations, for a smoke test")
    args = parser.parse_args()
    context = mfd.init_from_env()  # None outside torchrun: one process
    try:
        train(tiny=args.tiny)
        mfd.shutdown(context)  # all ranks together; nothing outside torchrun
    finally:  # on an error, without waiting for peers that may never come (else a no-op)
        mfd.shutdown(context, together=False)


def train(*, tiny: bool) -> None:
    iterations, meta_batch = (10, 4) if tiny else (2000, 25)
    alg = MAML(mf.mlp(), inner_lr=0.01, inner_steps=1, loss="mse")
    meta = mfd.broadcast_tree(alg.init(torch.Generator().manual_seed(0)))  # rank 0's start
    opt = mf.optim.adam(1e-3)
    state = opt.init(meta)
    tasks, gen = mf.data.SinusoidTasks(shots=10), torch.Generator().manual_seed(1)

    for it in range(iterations):
        batch = tasks.sample(meta_batch, gen)  # the same whole meta-batch on every rank
        local = mfd.split_batch(batch)  # this rank's tasks
        grads, loss, _ = alg.meta_grad(meta, local)  # the mean over this rank's tasks
        grads, loss = mfd.all_reduce_mean((grads, loss), weight=local.num_tasks)  # over all
        updates, state = opt.update(grads, state, meta)
        meta = mf.optim.apply_updates(meta, updates)
        if mfd.rank() == 0 and it % max(1, iterations // 5) == 0:
            print(f"iteration {it}: meta-loss {float(loss):.3f}")

    mfd.assert_in_sync(meta, what="meta-parameters")
    test = tasks.sample(100, torch.Generator().manual_seed(2))
    local = mfd.split_batch(test)
    mse = alg.evaluate(meta, local, steps=1)["loss"].mean(0)
    mse = mfd.all_reduce_mean(mse, weight=local.num_tasks)
    if mfd.rank() == 0:
        print(f"ranks: {mfd.world_size()}, meta-parameters in sync")
        print(f"query MSE before adaptation {mse[0]:.4f}, after 1 step {mse[1]:.4f}")


if __name__ == "__main__":
    main()
