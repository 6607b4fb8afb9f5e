"""R2D2's ridge head and MetaOptNet's SVM head: their gradients against autograd through a
direct solve, the gradient unrolled through the dual solver, and central finite differences,
in float64; both algorithms under every strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from references import rel_err
from torch.func import grad

import metafunc as mf
from metafunc import TaskBatch, tree
from metafunc.algorithms import R2D2, MetaOptNet, ridge_logits, svm_logits

DT = torch.float64
WAYS = 5


def features(seed: int, support: int = 10, query: int = 6, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(support, dim, generator=gen, dtype=DT)
    q = torch.randn(query, dim, generator=gen, dtype=DT)
    y = torch.arange(WAYS).repeat(support // WAYS)
    qy = torch.arange(WAYS).repeat(2)[:query]
    return s, y, q, qy


def test_r2d2_head_equals_autograd_through_the_primal_solve():
    s, y, q, qy = features(0)
    lam = torch.tensor(0.3, dtype=DT)

    def woodbury(s, q, lam):
        return F.cross_entropy(ridge_logits(s, y, q, WAYS, lam), qy)

    def primal(s, q, lam):  # (ΦᵀΦ + λI)⁻¹ ΦᵀY, the D x D system
        onehot = F.one_hot(y, WAYS).to(DT)
        w = torch.linalg.solve(s.T @ s + lam * torch.eye(s.shape[1], dtype=DT), s.T @ onehot)
        return F.cross_entropy(q @ w, qy)

    assert float(woodbury(s, q, lam)) == pytest.approx(float(primal(s, q, lam)), rel=1e-12)
    got = grad(woodbury, argnums=(0, 1, 2))(s, q, lam)
    want = grad(primal, argnums=(0, 1, 2))(s, q, lam)
    for a, b in zip(got, want, strict=True):
        assert float((a - b).norm() / b.norm()) <= 1e-10


def test_svm_head_gradient_equals_unrolled_and_finite_differences():
    s, y, q, qy = features(1)

    def loss(s, q):
        return F.cross_entropy(svm_logits(s, y, q, WAYS, c=0.1, steps=1500, tol=1e-12), qy)

    def unrolled(s, q):
        onehot = F.one_hot(y, WAYS).to(DT)
        from metafunc.algorithms.heads import project_rows

        gram = s @ s.T + torch.eye(len(s), dtype=DT)
        eta = 1.0 / torch.linalg.matrix_norm(gram.detach(), ord=2)
        alpha = torch.zeros_like(onehot)
        for _ in range(3000):  # the plain projected step, to its fixed point
            alpha = project_rows(alpha + eta * (onehot - gram @ alpha), 0.1 * onehot)
        return F.cross_entropy((q @ s.T) @ alpha, qy)

    implicit = grad(loss)(s, q)
    through = grad(unrolled)(s, q)
    assert float((implicit - through).norm() / through.norm()) <= 1e-6
    eps = 1e-6
    for i, j in [(0, 0), (3, 5), (7, 2), (9, 15)]:
        e = torch.zeros_like(s)
        e[i, j] = eps
        fd = (loss(s + e, q) - loss(s - e, q)) / (2 * eps)
        assert abs(float(implicit[i, j] - fd)) <= 1e-6 * max(1.0, abs(float(fd))) + 1e-9


def episodes(seed: int, tasks: int = 4) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, WAYS, 1, 28, 28, generator=gen, dtype=DT)
    q = torch.randn(tasks, 2 * WAYS, 1, 28, 28, generator=gen, dtype=DT)
    y = torch.arange(WAYS).expand(tasks, -1).clone()
    return TaskBatch(x, y, q, torch.arange(WAYS).repeat(2).expand(tasks, -1).clone())


@pytest.mark.parametrize(("cls", "rtol"), [(R2D2, 1e-9), (MetaOptNet, 1e-6)])
def test_both_algorithms_give_one_meta_gradient_under_every_strategy(cls, rtol):
    """Equal across strategies: exactly for R2D2's closed form, to the tolerance of the SVM's
    implicit solve (1e-8 relative residual; vmap runs its iterations to the cap, the loop
    stops when converged) for MetaOptNet."""
    batch = episodes(2)
    grads = {}
    for strategy in ("vmap", "loop", "threads"):
        alg = cls(mf.conv4(None, hidden=8), shots=1, strategy=strategy)
        meta = tree.cast(alg.init(torch.Generator().manual_seed(3)), DT)
        g, loss, metrics = alg.meta_grad(meta, batch)
        assert torch.isfinite(loss) and set(metrics) == {"loss", "accuracy"}
        assert tree.structure(g) == tree.structure(meta)
        grads[strategy] = g
        accuracy = alg.evaluate(meta, batch, 0)["accuracy"]
        assert accuracy.shape == (4, 1)
    for strategy in ("loop", "threads"):
        err = tree.global_norm(tree.sub(grads[strategy], grads["vmap"]))
        assert float(err / tree.global_norm(grads["vmap"])) <= rtol


def test_metaoptnet_ridge_head_is_the_closed_form_ridge_with_a_learned_scale():
    batch = episodes(2)
    alg = MetaOptNet(mf.conv4(None, hidden=8), shots=1, head="ridge", lam=50.0)
    meta = tree.cast(alg.init(torch.Generator().manual_seed(3)), DT)
    meta["head"]["scale"] = torch.tensor(2.5, dtype=DT)
    emb = alg.model.apply(meta["params"], torch.cat([batch.support_x[0], batch.query_x[0]]))
    ridge = ridge_logits(emb[:WAYS], batch.support_y[0], emb[WAYS:], WAYS, 50.0)
    logits = alg.task_logits(meta, TaskBatch(*(f[0] for f in batch)))
    assert torch.allclose(logits, 2.5 * ridge, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"MetaOptNet\(head\): 'qp' is not 'svm' or 'ridge'"):
        MetaOptNet(mf.conv4(None, hidden=8), shots=1, head="qp")


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls, kw, tol",
    [(R2D2, {}, 1e-10), (MetaOptNet, {"head": "ridge"}, 1e-10), (MetaOptNet, {}, 1e-6)],
    ids=["r2d2", "metaoptnet-ridge", "metaoptnet-svm"],
)
def test_heads_on_resnet12_with_tasks_vmapped_equal_the_loop(cls, kw, tol):
    """On ResNet-12 (batch norm in the body, first order through it), the heads' meta-gradient
    with tasks under ``vmap`` equals the per-task loop's; the SVM's dual solve runs its
    iterations to the end under ``vmap`` and may stop at its tolerance in the loop."""
    import dataclasses

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 3, 16, 16, dtype=DT, generator=gen)
    y = torch.arange(WAYS).repeat(2).expand(3, 10).contiguous()
    batch = TaskBatch(x, y, x.flip(1) + 0.1, y.flip(1).contiguous())
    loop = cls(mf.resnet12(None, channels=(4, 6, 8, 10)), shots=2, strategy="loop", **kw)
    meta = tree.cast(loop.init(torch.Generator().manual_seed(1)), DT)
    ref, ref_loss, _ = loop.meta_grad(meta, batch)
    grads, loss, _ = dataclasses.replace(loop, strategy="vmap").meta_grad(meta, batch)
    assert rel_err(grads, ref) <= tol
    assert abs(float(loss - ref_loss)) <= 1e-12
