"""Reptile, iMAML, Prototypical Networks and the fine-tune baseline against references computed
another way (explicit per-task loops in float64, a dense linear solve), a memory probe, and a
sinusoid smoke test of every gradient-based algorithm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafunc import TaskBatch, conv4, from_module, mlp, optim, resnet12, tree
from metafunc.algorithms import (
    ANIL,
    IMAML,
    MAML,
    Baseline,
    FirstOrderMAML,
    MAMLPlusPlus,
    MetaSGD,
    ProtoNet,
    Reptile,
    pretrain_batch,
    prototype_logits,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def rel_err(a: dict, b: dict) -> float:
    assert tree.structure(a) == tree.structure(b)
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


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


def ref_embed(p, x):
    """conv4(None) written with F.conv2d / F.batch_norm: an independent reference."""
    for i in range(4):
        x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=2, padding=1)
        x = F.batch_norm(x, None, None, p[f"bn{i}.weight"], p[f"bn{i}.bias"], training=True)
        x = F.relu(x)
    return x.mean(dim=(2, 3))


def ref_mlp(p, x):
    names = sorted(k[: -len(".weight")] for k in p if k.endswith(".weight") and k != "head.weight")
    for name in names:
        x = torch.tanh(x @ p[f"{name}.weight"].T + p[f"{name}.bias"])
    return x @ p["head.weight"].T + p["head.bias"]


# ---------------------------------------------------------------------------------------------
# Reptile
# ---------------------------------------------------------------------------------------------


def ref_reptile_params(params, batch, lr, steps, eps, kind, b1=0.0, b2=0.999, adam_eps=1e-8):
    """θ + ε mean_t(φ_t − θ) with φ_t from an explicit loop of manual SGD / Adam steps."""
    names = list(params)
    deltas = []
    for t in range(batch.support_x.shape[0]):
        fast = {k: params[k].detach().clone() for k in names}
        m = {k: torch.zeros_like(v) for k, v in fast.items()}
        v = {k: torch.zeros_like(x) for k, x in fast.items()}
        for step in range(1, steps + 1):
            leaves = {k: x.requires_grad_() for k, x in fast.items()}
            loss = F.mse_loss(ref_mlp(leaves, batch.support_x[t]), batch.support_y[t])
            grads = dict(zip(names, torch.autograd.grad(loss, list(leaves.values())), strict=True))
            with torch.no_grad():
                for k in names:
                    if kind == "sgd":
                        fast[k] = fast[k] - lr * grads[k]
                    else:
                        m[k] = b1 * m[k] + (1 - b1) * grads[k]
                        v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
                        m_hat, v_hat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
                        fast[k] = fast[k] - lr * m_hat / (v_hat.sqrt() + adam_eps)
        deltas.append({k: fast[k] - params[k] for k in names})
    return {k: params[k] + eps * sum(d[k] for d in deltas) / len(deltas) for k in names}


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reptile_update_matches_sequential_reference(gen, strategy, kind):
    model = mlp((1, 8, 8, 1), activation="tanh", init="xavier")
    lr = 0.05 if kind == "sgd" else 0.01
    alg = Reptile(
        model, inner_lr=lr, inner_steps=4, inner_optimizer=kind, loss="mse", strategy=strategy
    )
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    opt = alg.outer_optimizer(0.7, 100)
    updates, _ = opt.update(grads, opt.init(meta), meta)
    new = optim.apply_updates(meta, updates)["params"]
    ref = ref_reptile_params(meta["params"], batch, lr, 4, 0.7, kind)
    assert tree.structure(new) == tree.structure(ref)
    err = max(float((new[k] - ref[k]).abs().max()) for k in ref)
    assert err <= 1e-10, err
    assert float(tree.global_norm(tree.sub(new, meta["params"]))) > 1e-2  # it moved
    assert not loss.requires_grad and set(metrics) == {"loss", "support_loss"}


def test_reptile_annealed_outer_step_falls_linearly(gen):
    alg = Reptile(mlp((1, 4, 1)), loss="mse", anneal=True)
    meta = alg.init(gen, dtype=torch.float64)
    g = tree.ones_like(meta)
    opt = alg.outer_optimizer(1.0, 4)
    state = opt.init(meta)
    for k in range(6):
        updates, state = opt.update(g, state, meta)
        expected = -max(1.0 - k / 4, 0.0)
        assert all(torch.allclose(u, torch.full_like(u, expected)) for u in tree.leaves(updates))


# ---------------------------------------------------------------------------------------------
# iMAML
# ---------------------------------------------------------------------------------------------


def ref_imaml_grad(params, batch, lam, lr, steps, regu=0.0, damping=0.0):
    """Mean over tasks of (I + H/λ)^-1 ∇L_query(φ), by a dense Hessian and a direct solve, with φ
    from an explicit proximal gradient-descent loop over a flat parameter vector. With ``regu``
    and ``damping`` the matrix is (1 + regu) I + H / (λ + damping)."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def unflat(vec):
        return {k: c.view(s) for k, c, s in zip(names, vec.split(sizes), shapes, strict=True)}

    theta = torch.cat([params[k].reshape(-1) for k in names]).detach()
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    total = torch.zeros_like(theta)
    total_plain = torch.zeros_like(theta)
    for t in range(batch.support_x.shape[0]):
        sx, sy, qx, qy = (field[t] for field in batch)

        def support(vec, sx=sx, sy=sy):
            return F.mse_loss(ref_mlp(unflat(vec), sx), sy)

        phi = theta.clone()
        for _ in range(steps):
            phi.requires_grad_()
            loss = support(phi) + 0.5 * lam * ((phi - theta) ** 2).sum()
            (g,) = torch.autograd.grad(loss, phi)
            phi = (phi - lr * g).detach()
        phi.requires_grad_()
        (g_query,) = torch.autograd.grad(F.mse_loss(ref_mlp(unflat(phi), qx), qy), phi)
        hessian = torch.autograd.functional.hessian(support, phi.detach())
        total += torch.linalg.solve((1 + regu) * eye + hessian / (lam + damping), g_query)
        total_plain += g_query
    n = batch.support_x.shape[0]
    return unflat(total / n), unflat(total_plain / n)


@pytest.mark.parametrize(
    "strategy, regu, damping",
    [("loop", 0.0, 0.0), ("threads", 0.0, 0.0), ("vmap", 0.0, 0.0), ("vmap", 1.0, 10.0)],
)
def test_imaml_gradient_matches_dense_implicit_solve(gen, strategy, regu, damping):
    model = mlp((1, 4, 1), activation="tanh", init="xavier")
    alg = IMAML(
        model,
        lam=1.0,
        inner_lr=0.05,
        inner_steps=20,
        cg_steps=40,
        regu_coef=regu,
        lam_damping=damping,
        loss="mse",
        strategy=strategy,
    )
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    grads, loss, _ = alg.meta_grad(meta, batch)
    ref, plain = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20, regu, damping)
    plain = tree.scale(1 / (1 + regu), plain)
    err = rel_err(grads["params"], ref)
    assert err <= 1e-6, err
    assert rel_err(plain, ref) > 1e-2  # the Hessian term matters, so the check can fail
    assert not loss.requires_grad


def test_imaml_few_cg_steps_approximate_the_solve(gen):
    """CG's error falls with iterations (and 1 step is a different answer: no silent early exit)."""
    model = mlp((1, 4, 1), activation="tanh", init="xavier")
    batch = sine_tasks(gen, 2, dtype=torch.float64)
    errors = []
    for cg_steps in (1, 3, 40):
        alg = IMAML(model, lam=1.0, inner_lr=0.05, inner_steps=20, cg_steps=cg_steps, loss="mse")
        meta = alg.init(torch.Generator().manual_seed(1), dtype=torch.float64)
        ref, _ = ref_imaml_grad(meta["params"], batch, 1.0, 0.05, 20)
        errors.append(rel_err(alg.meta_grad(meta, batch)[0]["params"], ref))
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-3


def peak_bytes(fn) -> int:
    """Peak CPU tensor memory allocated while ``fn`` runs, above what was live before: the running
    sum of the profiler's allocation/free events. A memory probe, not a timing."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def test_imaml_memory_does_not_grow_with_inner_steps(gen):
    model = mlp((1, 64, 1))
    batch = sine_tasks(gen, 1, support=256, query=16)
    peaks = {}
    for cls, kw in ((MAML, {}), (IMAML, {"cg_steps": 1})):
        for steps in (5, 50):
            alg = cls(model, inner_lr=0.01, inner_steps=steps, loss="mse", strategy="loop", **kw)
            meta = alg.init(gen)
            peaks[cls.__name__, steps] = peak_bytes(
                lambda alg=alg, meta=meta: alg.meta_grad(meta, batch)
            )
    print("peak bytes:", peaks)
    assert peaks["MAML", 50] > 5 * peaks["MAML", 5]  # the probe sees a graph that grows
    assert peaks["IMAML", 50] == peaks["IMAML", 5]


# ---------------------------------------------------------------------------------------------
# Prototypical Networks
# ---------------------------------------------------------------------------------------------


def ref_protonet_loss(params, batch, ways):
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        sx, sy, qx, qy = (field[t] for field in batch)
        emb = ref_embed(params, torch.cat([sx, qx]))
        support, query = emb[: sx.shape[0]], emb[sx.shape[0] :]
        protos = torch.stack([support[sy == k].mean(0) for k in range(ways)])
        logits = -torch.stack([((query - protos[k]) ** 2).sum(-1) for k in range(ways)], dim=1)
        total = total + F.cross_entropy(logits, qy)
    return total / batch.support_x.shape[0]


@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_protonet_gradient_matches_per_task_reference(gen, strategy):
    alg = ProtoNet(conv4(None, hidden=8), shots=2, strategy=strategy)
    meta = alg.init(gen, dtype=torch.float64)
    batch = class_tasks(gen, tasks=3, ways=3, shots=2, queries=2)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    leaves = {k: v.clone().requires_grad_() for k, v in meta["params"].items()}
    ref_loss = ref_protonet_loss(leaves, batch, ways=3)
    ref = dict(zip(leaves, torch.autograd.grad(ref_loss, list(leaves.values())), strict=True))
    assert abs(float(loss - ref_loss.detach())) <= 1e-12
    assert rel_err(grads["params"], ref) <= 1e-10
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_protonet_trains_60_way_and_evaluates_5_way(gen):
    """One instance (shots=1) trains on 60-way episodes and evaluates 5-way ones."""
    alg = ProtoNet(conv4(None, hidden=8, image_size=14), shots=1, strategy="vmap")
    meta = alg.init(gen)
    patterns = torch.randn(80, 1, 14, 14, generator=gen)  # one pattern per class

    def episode(ways, classes):
        x = patterns[classes].repeat_interleave(2, 0) + 0.5 * torch.randn(
            2 * ways, 1, 14, 14, generator=gen
        )
        y = torch.arange(ways).repeat_interleave(2)
        return TaskBatch(x[0::2][None], y[0::2][None], x[1::2][None], y[1::2][None])

    opt = alg.outer_optimizer(1e-2, 20)
    state = opt.init(meta)
    losses = []
    for _ in range(10):
        grads, loss, _ = alg.meta_grad(meta, episode(60, torch.randperm(60, generator=gen)))
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    test = episode(5, 60 + torch.randperm(20, generator=gen)[:5])  # unseen classes
    preds = alg.adapt_and_predict(meta, test, steps=2)
    assert preds.shape == (1, 3, 5, 5)
    assert torch.equal(preds[:, 0], preds[:, 2])
    assert float(alg.evaluate(meta, test, steps=0)["accuracy"].mean()) >= 0.8


def test_protonet_ways_from_shots_is_checked(gen):
    alg = ProtoNet(conv4(None, hidden=4), shots=2, ways=3)
    batch = class_tasks(gen, tasks=1, ways=2, shots=2, queries=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"2 classes x 2 shots, but ways=3"):
        alg.meta_loss(alg.init(gen), batch)


# ---------------------------------------------------------------------------------------------
# Pretrain-then-fine-tune baseline
# ---------------------------------------------------------------------------------------------


def blob_backbone():
    """A small feature extractor through from_module: 16 inputs -> 32 tanh features."""
    return from_module(nn.Sequential(nn.Linear(16, 32), nn.Tanh()))


def blob_tasks(gen, tasks=4, ways=5, shots=5, queries=10, spread=0.3):
    """Linearly separable tasks: each class a Gaussian blob around its own random centre."""
    centres = torch.randn(tasks, ways, 1, 16, generator=gen)

    def split(n):
        x = centres + spread * torch.randn(tasks, ways, n, 16, generator=gen)
        return x.flatten(1, 2), torch.arange(ways).repeat_interleave(n).expand(tasks, -1)

    return TaskBatch(*split(shots), *split(queries))


@pytest.mark.parametrize("finetune", ["head", "all"])
def test_baseline_finetuning_reaches_high_accuracy(gen, finetune):
    alg = Baseline(
        blob_backbone(), shots=5, finetune=finetune, inner_lr=0.05, inner_steps=30, strategy="vmap"
    )
    meta = alg.init(gen)
    batch = blob_tasks(gen, spread=0.6)
    query = alg.evaluate(meta, batch, steps=30)
    support = alg.evaluate(meta, TaskBatch(*batch[:2], *batch[:2]), steps=30)["loss"].mean(0)
    acc = query["accuracy"].mean(0)
    assert query["accuracy"].shape == (4, 31)
    assert float(acc[0]) <= 0.25  # a zero head: chance
    assert float(acc[-1]) >= 0.95
    assert float(support[-1]) < 0.05 * float(support[0])


def test_baseline_head_finetuning_leaves_backbone_unchanged(gen):
    batch = blob_tasks(gen, tasks=3)
    head = Baseline(blob_backbone(), shots=5, finetune="head", inner_lr=0.05, inner_steps=20)
    meta = head.init(gen)
    adapted = head.adapted_params(meta, batch)
    for k, v in meta["params"].items():
        assert torch.equal(adapted["params"][k], v.expand_as(adapted["params"][k]))
    # the predictions use that backbone and the adapted head
    feats = head.model.apply(meta["params"], batch.query_x.flatten(0, 1)).view(3, -1, 32)
    logits = feats @ adapted["head"]["weight"].transpose(1, 2) + adapted["head"]["bias"][:, None]
    assert torch.allclose(head.adapt_and_predict(meta, batch, 20)[:, -1], logits, atol=1e-6)
    full = Baseline(blob_backbone(), shots=5, finetune="all", inner_lr=0.05, inner_steps=20)
    moved = full.adapted_params(meta, batch)["params"]
    assert float((moved["0.weight"] - meta["params"]["0.weight"]).abs().max()) > 1e-3


def test_baseline_prototype_head_is_the_prototype_classifier(gen):
    batch = blob_tasks(gen, tasks=2)
    alg = Baseline(blob_backbone(), shots=5, head_init="prototypes")
    meta = alg.init(gen)
    first = alg.adapt_and_predict(meta, batch, steps=0)[:, 0]
    emb = alg.model.apply(meta["params"], batch.support_x.flatten(0, 1)).view(2, 25, 32)
    qemb = alg.model.apply(meta["params"], batch.query_x.flatten(0, 1)).view(2, 50, 32)
    ref = torch.stack([prototype_logits(emb[t], batch.support_y[t], qemb[t], 5) for t in range(2)])
    assert torch.allclose(first.log_softmax(-1), ref.log_softmax(-1), atol=1e-4)


def test_baseline_pretraining_loss_decreases(gen):
    images = torch.randn(10, 1, 1, 14, 14, generator=gen) + 0.3 * torch.randn(
        10, 20, 1, 14, 14, generator=gen
    )  # [classes, examples, C, H, W]
    alg = Baseline(
        conv4(None, hidden=8, image_size=14), num_train_classes=10, feature_dim=8, shots=1
    )
    meta = alg.init(gen)
    assert meta["classifier"]["weight"].shape == (10, 8)
    opt = alg.outer_optimizer(1e-2, 40)
    state = opt.init(meta)
    losses = []
    for _ in range(40):
        x, y = pretrain_batch(images, 32, gen)
        grads, loss, _ = alg.pretrain_grad(meta, x, y)
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="pretrain_loss"):
        alg.meta_loss(meta, class_tasks(gen, 1, 2, 1, 1, size=14, dtype=torch.float32))


def _torchvision_resnet18_backbone():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    net.fc = nn.Identity()
    return from_module(net)


@pytest.mark.parametrize(
    ("backbone", "dim"),
    [(lambda: resnet12(None, channels=(8, 8, 16, 16)), 16), (_torchvision_resnet18_backbone, 512)],
    ids=["resnet12", "torchvision-resnet18"],
)
def test_baseline_pretrains_and_finetunes_resnet_backbones(gen, backbone, dim):
    alg = Baseline(backbone(), num_train_classes=6, feature_dim=dim, shots=1, inner_steps=3)
    meta = alg.init(gen, dtype=torch.float64)
    x = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    grads, loss, _ = alg.pretrain_grad(meta, x, torch.arange(8) % 6)
    assert torch.isfinite(loss) and set(grads) == {"params", "classifier"}
    assert float(tree.global_norm(grads["params"])) > 0
    batch = class_tasks(gen, 2, 3, 1, 2, size=32)
    batch = TaskBatch(*(t.expand(-1, -1, 3, -1, -1) if t.dim() == 5 else t for t in batch))
    per_strategy = []
    for strategy in ("vmap", "loop"):
        tuned = Baseline(
            alg.model, num_train_classes=6, feature_dim=dim, shots=1, inner_steps=3,
            strategy=strategy,
        )  # fmt: skip
        per_strategy.append(tuned.adapt_and_predict(meta, batch, steps=3))
    assert per_strategy[0].shape == (2, 4, 6, 3)
    assert torch.allclose(per_strategy[0], per_strategy[1], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(per_strategy[0][:, 0], per_strategy[0][:, -1])  # the head trained


def test_pretrain_batch_labels_and_determinism():
    images = torch.arange(6 * 4, dtype=torch.float32).view(6, 4, 1, 1, 1)
    x, y = pretrain_batch(images, 10, torch.Generator().manual_seed(3))
    x2, y2 = pretrain_batch(images, 10, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert y.dtype == torch.int64 and torch.equal(y, (x.flatten() // 4).long())
    assert x.flatten().unique().numel() == 10  # distinct examples


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_baseline_loads_pretrained_weights(gen, tmp_path, fmt):
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
    torch.nn.init.normal_(net[0].weight, generator=gen)
    state = {**net.state_dict(), "fc.weight": torch.zeros(3, 3)}  # extra entries are ignored
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    alg = Baseline(from_module(nn.Sequential(nn.Linear(16, 32), nn.Tanh())), shots=5)
    meta = alg.init(gen, weights=path)
    assert torch.equal(meta["params"]["0.weight"], net[0].weight.detach())
    bad = Baseline(blob_backbone(), shots=5)
    torch.save({"0.weight": torch.zeros(32, 16)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"no entry for \['0.bias'\]"):
        bad.init(gen, weights=tmp_path / "partial.pt")


def test_baseline_regression_pretrains_on_all_points_and_finetunes_everything(gen):
    alg = Baseline(mlp((1, 8, 1), init="xavier"), loss="mse", inner_lr=0.01, inner_steps=5)
    assert (alg.finetune, alg.inner_optimizer) == ("all", "sgd")
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    loss, _ = alg.meta_loss(meta, batch)
    ref = (
        sum(
            F.mse_loss(
                ref_mlp_relu(meta["params"], torch.cat([batch.support_x[t], batch.query_x[t]])),
                torch.cat([batch.support_y[t], batch.query_y[t]]),
            )
            for t in range(3)
        )
        / 3
    )
    assert abs(float(loss - ref)) <= 1e-12
    moved = alg.adapted_params(meta, batch)["params"]
    assert float((moved["fc0.weight"][0] - meta["params"]["fc0.weight"]).abs().max()) > 0
    support = alg.evaluate(meta, TaskBatch(*batch[:2], *batch[:2]), steps=5)["loss"].mean(0)
    assert float(support[-1]) < float(support[0])


def ref_mlp_relu(p, x):
    return torch.relu(x @ p["fc0.weight"].T + p["fc0.bias"]) @ p["head.weight"].T + p["head.bias"]


# ---------------------------------------------------------------------------------------------
# Hyper-parameter errors
# ---------------------------------------------------------------------------------------------

SINE = mlp((1, 4, 1))
EMBED = conv4(None, hidden=4)

BAD = [
    (lambda: Reptile(SINE, inner_lr=-0.1), r"Reptile\(inner_lr\): must be a float >= 0"),
    (lambda: Reptile(SINE, inner_steps=0), r"Reptile\(inner_steps\): must be an int >= 1"),
    (lambda: Reptile(SINE, inner_optimizer="rmsprop"), r"Reptile\(inner_optimizer\)"),
    (lambda: Reptile(SINE, inner_b1=1.0), r"Reptile\(inner_b1\): must be in \[0, 1\)"),
    (lambda: Reptile(SINE).outer_optimizer(-1.0, 10), r"Reptile.outer_optimizer\(lr\)"),
    (lambda: IMAML(SINE, lam=0.0), r"IMAML\(lam\): must be a float > 0.*try lam=2.0"),
    (lambda: IMAML(SINE, lam=-1.0), r"IMAML\(lam\): must be a float > 0"),
    (lambda: IMAML(SINE, cg_steps=0), r"IMAML\(cg_steps\): must be an int >= 1"),
    (lambda: IMAML(SINE, inner_steps=0), r"IMAML\(inner_steps\): must be an int >= 1"),
    (lambda: IMAML(SINE, inner_lr=-1e-3), r"IMAML\(inner_lr\): must be a float >= 0"),
    (lambda: IMAML(SINE, cg_tol=-1.0), r"IMAML\(cg_tol\): must be a float >= 0"),
    (lambda: IMAML(SINE, lam_damping=-1.0), r"IMAML\(lam_damping\): must be a float >= 0"),
    (lambda: ProtoNet(EMBED), r"ProtoNet\(ways, shots\).*ProtoNet\(model, shots=5\)"),
    (lambda: ProtoNet(EMBED, shots=0), r"ProtoNet\(shots\): must be a positive int"),
    (lambda: ProtoNet(conv4(5), shots=1), r"ProtoNet\(model\).*conv4\(None\)"),
    (lambda: ProtoNet(EMBED, shots=1, loss="mse"), r"ProtoNet\(loss\)"),
    (
        lambda: Baseline(EMBED, shots=1, inner_lr=-1.0),
        r"Baseline\(inner_lr\): must be a float >= 0",
    ),
    (
        lambda: Baseline(EMBED, shots=1, inner_steps=0),
        r"Baseline\(inner_steps\): must be an int >= 1",
    ),
    (lambda: Baseline(EMBED, shots=1, finetune="body"), r"Baseline\(finetune\)"),
    (lambda: Baseline(EMBED, shots=1, head_init="random"), r"Baseline\(head_init\)"),
    (
        lambda: Baseline(EMBED, num_train_classes=64, shots=1),
        r"Baseline\(feature_dim\).*feature_dim=64",
    ),
    (
        lambda: Baseline(EMBED, num_train_classes=0, feature_dim=4, shots=1),
        r"Baseline\(num_train_classes\)",
    ),
    (lambda: Baseline(conv4(5), shots=1), r"Baseline\(model\).*conv4\(None\)"),
    (lambda: Baseline(SINE, loss="mse", num_train_classes=3), r"Baseline\(num_train_classes\)"),
    (lambda: Baseline(EMBED), r"Baseline\(ways, shots\)"),
]


@pytest.mark.parametrize(
    "make, message", BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD]
)
def test_bad_hyper_parameters_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------------------------
# Sinusoid smoke test
# ---------------------------------------------------------------------------------------------


def sine_mlp():
    """MAML's 1-40-40-1 ReLU network with Glorot weights. From the paper's std-0.01 normal
    init the output starts at ~0 and learning is slow: MAML below reaches a post-adaptation MSE
    of 2.06 after 300 iterations from it, 0.52 from Glorot."""
    return mlp(init="xavier")


class Smoke(NamedTuple):
    make: Callable[[], Any]
    outer_lr: float
    iterations: int = 300
    meta_batch: int = 25
    clip: float | None = None  # the meta-gradient's global norm, before the outer optimizer


# Every case evaluates after the number of inner steps it trains with. With OMP_NUM_THREADS=1 on
# the 2-core CPU each takes 3-15 s. Where a first choice failed, the comment says how.
SMOKE = {
    "maml": Smoke(
        lambda: MAML(sine_mlp(), inner_lr=0.01, inner_steps=5, loss="mse", strategy="vmap"),
        3e-3,
    ),
    # At inner_lr 0.02 the first-order meta-gradient, blind to the inner loop's curvature, lets
    # the network sharpen until 5 steps at 0.02 oscillate: in 500 iterations the pre-adaptation
    # MSE blew up (52) or went to NaN in 2 of 3 seeds.
    "fomaml": Smoke(
        lambda: FirstOrderMAML(
            sine_mlp(), inner_lr=0.01, inner_steps=5, loss="mse", strategy="vmap"
        ),
        3e-3,
        iterations=400,
    ),
    # Only the head adapts, on features computed once, so 10 steps are cheap.
    "anil": Smoke(
        lambda: ANIL(sine_mlp(), inner_lr=0.05, inner_steps=10, loss="mse", strategy="vmap"),
        3e-3,
    ),
    # One inner step, as in Li et al.'s regression experiment: with 5 steps the learned
    # per-entry rates (some to 0.28, some below 0) made the inner loop diverge by iteration 240.
    "metasgd": Smoke(
        lambda: MetaSGD(sine_mlp(), inner_lr=0.02, inner_steps=1, loss="mse", strategy="vmap"),
        3e-3,
    ),
    # No batch norm in the MLP: LSLR, the multi-step loss and cosine annealing are what runs.
    # Adam moves each per-layer rate by ~lr per iteration, so rates of 0.02 soon cross zero or
    # triple; a task whose inner loop then diverges sends a 1e3-1e7 meta-gradient that wrecks
    # Adam's moments (unclipped, seed 0: post-adaptation MSE 0.85 at iteration 140, 2449 at 200).
    "mamlpp": Smoke(
        lambda: MAMLPlusPlus(sine_mlp(), inner_lr=0.02, inner_steps=3, loss="mse", strategy="vmap"),
        1e-2,
        iterations=400,
        clip=10.0,
    ),
    "reptile": Smoke(
        lambda: Reptile(sine_mlp(), inner_lr=0.02, inner_steps=10, loss="mse", strategy="vmap"),
        1.0,
        iterations=200,
        meta_batch=5,
    ),
    "imaml": Smoke(
        lambda: IMAML(
            sine_mlp(),
            lam=2.0,
            inner_lr=0.03,
            inner_steps=10,
            inner_optimizer="adam",
            cg_steps=3,
            loss="mse",
            strategy="vmap",
        ),
        3e-3,
        iterations=200,
        meta_batch=5,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_sinusoid_meta_training_makes_adaptation_work(name):
    case = SMOKE[name]
    alg = case.make()
    gen = torch.Generator().manual_seed(0)
    meta = alg.init(gen)
    opt = alg.outer_optimizer(case.outer_lr, case.iterations)
    if case.clip is not None:
        opt = optim.chain(optim.clip_by_global_norm(case.clip), opt)
    state = opt.init(meta)
    test = sine_tasks(torch.Generator().manual_seed(1), 100)
    steps = alg.inner_steps
    before = alg.evaluate(meta, test, steps=steps)["loss"].mean(0)
    for i in range(case.iterations):
        grads, _, _ = alg.meta_grad(meta, sine_tasks(gen, case.meta_batch), iteration=i)
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
    after = alg.evaluate(meta, test, steps=steps)["loss"].mean(0)
    pre, post = float(after[0]), float(after[-1])
    print(
        f"{name}: at init pre {float(before[0]):.3f} post {float(before[-1]):.3f}; "
        f"trained pre {pre:.3f} post {post:.3f}"
    )
    assert post < 0.5 * pre  # adaptation does the work
    assert post < 0.6 * float(before[-1])  # and meta-training is what made it work


def test_protonet_outer_learning_rate_halves_on_schedule():
    alg = ProtoNet(EMBED, shots=1, halve_every=2)
    opt = alg.outer_optimizer(1.0, 7)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state, steps = opt.init(params), []
    for _ in range(7):  # a constant gradient: Adam's step is the learning rate
        updates, state = opt.update({"w": torch.ones(3, dtype=torch.float64)}, state, params)
        steps.append(-float(updates["w"][0]))
    assert steps == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25, 0.125], rel=1e-6)
    schedule = alg.outer_schedule(1.0, 7)  # what the harness logs is what Adam applied
    assert [float(schedule(torch.tensor(t))) for t in range(7)] == pytest.approx(steps, rel=1e-6)
    assert ProtoNet(EMBED, shots=1, halve_every=None).outer_optimizer(1.0, 7) is not None
    with pytest.raises(ValueError, match=r"ProtoNet\(halve_every\)"):
        ProtoNet(EMBED, shots=1, halve_every=0)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing across inner steps
# ---------------------------------------------------------------------------------------------


class MomentumMAML(MAML):
    """MAML whose inner optimizer has a floating state (momentum) and a step counter."""

    def inner_optimizer(self, meta_params):
        return optim.sgd(optim.schedules.exponential_decay(self.inner_lr, 0.9), momentum=0.9)


CHECKPOINTED = {
    "maml": (MAML, {}),
    "fomaml": (MAML, {"first_order": True}),
    "metasgd": (MetaSGD, {}),
    "head-only": (MAML, {"trainable": "head"}),
    "momentum": (MomentumMAML, {}),
}


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_checkpointed_meta_gradient_equals_the_full_graph(gen, name, strategy):
    cls, kw = CHECKPOINTED[name]
    model = conv4(3, hidden=4)
    batch = class_tasks(gen, 3, 3, 2, 2)
    plain = cls(model, inner_lr=0.3, inner_steps=3, strategy=strategy, **kw)
    meta = plain.init(gen, dtype=torch.float64)
    ref, ref_loss, _ = plain.meta_grad(meta, batch)
    ckpt = cls(model, inner_lr=0.3, inner_steps=3, strategy=strategy, checkpoint=True, **kw)
    grads, loss, metrics = ckpt.meta_grad(meta, batch)
    assert rel_err(grads, ref) <= 1e-10
    assert abs(float(loss - ref_loss)) <= 1e-12 and "accuracy" in metrics


def test_checkpointed_memory_does_not_grow_like_the_graph(gen):
    model = mlp((1, 64, 64, 1))
    batch = sine_tasks(gen, 1, support=256, query=16)
    peaks = {}
    for checkpoint in (False, True):
        for steps in (4, 32):
            alg = MAML(model, inner_lr=0.01, inner_steps=steps, loss="mse", strategy="loop",
                       checkpoint=checkpoint)  # fmt: skip
            meta = alg.init(gen)
            peaks[checkpoint, steps] = peak_bytes(lambda a=alg, m=meta: a.meta_grad(m, batch))
    print("peak bytes:", peaks)
    assert peaks[False, 32] > 5 * peaks[False, 4]  # the whole graph: grows with the steps
    # checkpointed: one step's graph plus one copy of the parameters per step
    param_bytes = sum(v.numel() * v.element_size() for v in meta["params"].values())
    assert peaks[True, 32] - peaks[True, 4] <= 28 * 1.5 * param_bytes
    assert peaks[True, 32] < peaks[False, 32] / 4


def test_checkpoint_is_refused_where_the_inner_loop_is_custom():
    with pytest.raises(ValueError, match=r"ANIL\(checkpoint\).*leave checkpoint=False"):
        ANIL(conv4(3, hidden=4), checkpoint=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: MAML(
            sine_mlp(), inner_lr=0.02, inner_steps=2, loss="mse", strategy=s, chunk_size=2
        ),
        lambda s: ProtoNet(conv4(None, hidden=4), shots=2, strategy=s, chunk_size=2),
    ],
    ids=["maml", "protonet"],
)
@pytest.mark.parametrize("strategy", ["loop", "chunked"])
def test_meta_grad_by_pieces_equals_the_whole_batch(make, strategy, monkeypatch):
    """``meta_grad`` differentiates a piece of tasks at a time (one on the loop, ``chunk_size``
    chunked) and averages by task count: the same gradient, loss and metrics as one backward
    through the whole meta-batch, also with a short last piece (5 tasks in pieces of 2)."""
    alg = make(strategy)
    gen = torch.Generator().manual_seed(3)
    meta = tree.map(lambda x: x.double(), alg.init(gen))
    if isinstance(alg, ProtoNet):
        x = torch.randn(5, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
        y = torch.arange(3).repeat_interleave(2).expand(5, -1).clone()
        batch = TaskBatch(x, y, x.flip(1), y.flip(1))
    else:
        batch = sine_tasks(gen, 5, dtype=torch.float64)
    assert alg.tasks_per_graph(batch, torch.device("cpu")) == (1 if strategy == "loop" else 2)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    monkeypatch.setattr(type(alg), "tasks_per_graph", lambda self, b, device: b.num_tasks)
    whole, whole_loss, whole_metrics = alg.meta_grad(meta, batch)
    assert float(tree.global_norm(tree.sub(grads, whole))) <= 1e-12 * float(tree.global_norm(whole))
    assert float(loss) == pytest.approx(float(whole_loss), rel=1e-12)
    assert metrics.keys() == whole_metrics.keys()
    for k in metrics:
        assert float(metrics[k]) == pytest.approx(float(whole_metrics[k]), rel=1e-12)
