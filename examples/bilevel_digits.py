"""Learning to reweight corrupted labels by hypergradient, on scikit-learn's digits.

A third of the training labels are random. A logistic regression trains on the examples weighted
by ``sigmoid(h_i)``; Adam learns ``h`` on the clean validation loss, whose gradient through the
training is a hypergradient (``metafunc.implicit.hypergradient``), computed three ways: implicit,
unrolled and finite-difference (DARTS). Prints each one's validation loss and the weight the
corrupted examples keep; ``--plot curves.png`` plots the curves (needs matplotlib).

    python examples/bilevel_digits.py --plot reweight.png    # --tiny: a few seconds, for CI
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from metafunc import optim
from metafunc.implicit import hypergradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few iterations, for CI")
    parser.add_argument("--plot", default=None, help="write the curves to this PNG")
    args = parser.parse_args()
    outer_steps, inner_steps = (3, 20) if args.tiny else (40, 200)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:600], order[600:1000]
    noisy = y[train].clone()
    corrupt = torch.rand(len(train), generator=torch.Generator().manual_seed(1)) < 1 / 3
    noisy[corrupt] = torch.randint(0, 10, (int(corrupt.sum()),))

    def inner(p, h):
        weights = torch.sigmoid(h["logit"])
        losses = F.cross_entropy(x[train] @ p["w"] + p["b"], noisy, reduction="none")
        return (weights * losses).sum() / weights.sum() + 1e-3 * (p["w"] ** 2).sum()

    def outer(p, h):
        return F.cross_entropy(x[val] @ p["w"] + p["b"], y[val])

    start = {"w": torch.zeros(64, 10, dtype=x.dtype), "b": torch.zeros(10, dtype=x.dtype)}
    curves = {}
    for method in ("implicit", "unrolled", "finite_difference"):
        hyper = {"logit": torch.zeros(len(train), dtype=x.dtype)}
        adam = optim.adam(0.3)
        state = adam.init(hyper)
        curve = []
        for _ in range(outer_steps):
            grads, info = hypergradient(
                inner, outer, hyper, start, method=method, steps=inner_steps,
                optimizer=optim.sgd(2.0), tol=1e-8, maxiter=200, xi=2.0,
            )  # fmt: skip
            curve.append(float(info.outer_loss))
            updates, state = adam.update(grads, state, hyper)
            hyper = optim.apply_updates(hyper, updates)
        weights = torch.sigmoid(hyper["logit"])
        kept = float(weights[corrupt].sum() / weights.sum())
        share = float(corrupt.float().mean())
        curves[method] = curve
        print(
            f"{method:18s} validation loss {curve[0]:.3f} -> {curve[-1]:.3f}; corrupted "
            f"examples hold {kept:.1%} of the weight (they are {share:.1%} of the examples)"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for method, curve in curves.items():
            plt.plot(range(1, len(curve) + 1), curve, label=method)
        plt.xlabel("outer iteration"), plt.ylabel("validation loss"), plt.legend()
        plt.title("Reweighting corrupted digits by hypergradient")
        plt.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
