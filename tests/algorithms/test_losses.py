"""A loss function of your own (``loss=``): the meta-gradient against the explicit per-task loop
with the same function, and a callable regression loss giving the named one's result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LR, conv_batch, sine_tasks, to
from references import check, ref_meta_grad

from metafunc import conv4, mlp, tree
from metafunc.algorithms import ANIL, MAML

# two intra-op threads, so that the 'threads' strategy runs tasks concurrently
pytestmark = pytest.mark.usefixtures("two_intra_op_threads")


@pytest.fixture
def batch(gen):
    return conv_batch(gen)


@pytest.mark.parametrize("cls", [MAML, ANIL])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_callable_loss(gen, batch, device, strategy, cls):
    """``loss=`` your own function (label-smoothed cross-entropy here), second order through
    three steps, against the explicit per-task loop with the same function; accuracy is still
    reported (integer labels, class scores), by meta_grad and by evaluate."""

    def smoothed(logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=0.2)

    alg = cls(conv4(3, hidden=6), inner_lr=LR, inner_steps=3, strategy=strategy, loss=smoothed)
    meta = alg.init(gen, dtype=torch.float64)
    keys = ["head.weight", "head.bias"] if cls is ANIL else None
    ref = ref_meta_grad(meta, batch, 3, lr=lambda leaves, k, n: LR, adapt_keys=keys,
                        loss_fn=smoothed)  # fmt: skip
    meta, batch = to(device, meta), to(device, batch)
    check(alg, meta, batch, ref)
    _, _, metrics = alg.meta_grad(meta, batch)
    scores = alg.evaluate(meta, batch, 1)
    assert set(metrics) == {"loss", "accuracy"} and set(scores) == {"loss", "accuracy"}
    assert scores["loss"].shape == (batch.num_tasks, 2)
    per_task = [smoothed(p, y) for p, y in zip(alg.adapt_and_predict(meta, batch, 1)[:, 1],
                                                batch.query_y, strict=True)]  # fmt: skip
    torch.testing.assert_close(scores["loss"][:, 1], torch.stack(per_task), rtol=1e-12, atol=0)


def test_a_callable_regression_loss_gives_the_named_ones_result(gen):
    """F.mse_loss passed as a function gives what loss='mse' gives: the same meta-gradient and
    the same evaluation, with no accuracy (floating targets)."""
    tasks = sine_tasks(gen, 4, dtype=torch.float64)
    named = MAML(mlp((1, 8, 1)), inner_lr=0.01, loss="mse", strategy="loop")
    own = MAML(mlp((1, 8, 1)), inner_lr=0.01, loss=F.mse_loss, strategy="loop")
    meta = named.init(gen, dtype=torch.float64)
    g1, l1, _ = named.meta_grad(meta, tasks)
    g2, l2, m2 = own.meta_grad(meta, tasks)
    assert tree.allclose(g1, g2, rtol=1e-14, atol=0) and set(m2) == {"loss"}
    assert float(l1) == float(l2)
    e1, e2 = named.evaluate(meta, tasks, 2), own.evaluate(meta, tasks, 2)
    assert set(e2) == {"loss"}
    torch.testing.assert_close(e1["loss"], e2["loss"], rtol=1e-12, atol=0)
