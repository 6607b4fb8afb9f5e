"""The independent references the algorithm tests check against (and ``test_gpu.py``,
``test_compile.py``, ``test_inner.py``): explicit per-task ``torch.autograd`` loops in float64, a
sequential Reptile, a dense implicit solve, written without the library's algorithms, and the
comparisons against them. The small tasks and models they run on are in ``helpers.py``.

Not a test module: pytest collects nothing here, and test modules import from it rather than
from each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metafunc import tree
from metafunc.algorithms.mamlpp import msl_weights


def ref_conv4(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """conv4 written independently: F.conv2d + F.batch_norm (plain autograd, no vmap)."""
    for i in range(4):
        x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride=2, padding=1)
        x = F.batch_norm(x, None, None, p[f"bn{i}.weight"], p[f"bn{i}.bias"], training=True)
        x = F.relu(x)
    return F.linear(x.mean(dim=(2, 3)), p["head.weight"], p["head.bias"])


def ref_meta_grad(
    meta, batch, steps, *, lr, adapt_keys=None, first_order=False, bn=None, weights=None,
    loss_fn=F.cross_entropy,
):  # fmt: skip
    """An explicit per-task loop: ``steps`` manual SGD steps with
    ``torch.autograd.grad(create_graph=not first_order)``.

    lr(k, name) -> rate; bn(k) -> per-step batch-norm params; weights -> per-step query weights;
    loss_fn(logits, labels) -> the support and query loss.
    """
    flat = tree.flatten_with_paths(meta)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in flat.items()}
    params = {k[len("params.") :]: v for k, v in leaves.items() if k.startswith("params.")}

    def forward(p, k, x):
        return ref_conv4({**p, **(bn(leaves, k) if bn else {})}, x)

    total = 0.0
    tasks = batch.support_x.shape[0]
    for t in range(tasks):
        fast = dict(params)
        keys = adapt_keys or list(fast)
        query_losses = []
        for k in range(steps):
            loss = loss_fn(forward(fast, k, batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in keys], create_graph=not first_order)
            fast = {
                **fast,
                **{n: fast[n] - lr(leaves, k, n) * g for n, g in zip(keys, grads, strict=True)},
            }
            query_losses.append(loss_fn(forward(fast, k + 1, batch.query_x[t]), batch.query_y[t]))
        if weights is None:
            total = total + query_losses[-1]
        else:
            total = total + sum(w * q for w, q in zip(weights, query_losses, strict=True))
    grads = torch.autograd.grad(total / tasks, list(leaves.values()), allow_unused=True)
    out = {
        k: (g if g is not None else torch.zeros_like(leaves[k]))
        for k, g in zip(leaves, grads, strict=True)
    }
    return out


def check(alg, meta, batch, ref, rtol=1e-8):
    """``alg.meta_grad(meta, batch)`` on the device of ``meta`` and ``batch``, against the flat
    reference ``ref`` (compared where ``ref`` is: the reference never moves)."""
    grads, loss, metrics = alg.meta_grad(meta, batch)
    flat = {
        k: v.to(ref[k].device) if k in ref else v for k, v in tree.flatten_with_paths(grads).items()
    }
    assert set(flat) == set(ref)
    err = tree.global_norm(tree.sub(flat, ref)) / tree.global_norm(ref)
    assert float(err) <= rtol, float(err)
    assert 0 <= float(metrics["accuracy"]) <= 1 and torch.isfinite(loss)


def mamlpp_case(alg, gen, batch, iteration):
    """MAML++ meta-parameters in float64 with distinct per-step rates and per-step batch-norm
    parameters (MSL over 100 iterations), and the per-task reference meta-gradient at
    ``iteration``."""
    steps = alg.inner_steps
    meta = alg.init(gen, dtype=torch.float64)
    meta["lr"] = {
        k: v * torch.tensor([1.0, 0.7, 1.3], dtype=v.dtype) for k, v in meta["lr"].items()
    }
    meta["bn"] = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
        for k, v in meta["bn"].items()
    }
    ref = ref_meta_grad(
        meta,
        batch,
        steps,
        lr=lambda leaves, k, n: leaves[f"lr.{n}"][k],
        bn=lambda leaves, k: {
            n[len("bn.") :]: v[k] for n, v in leaves.items() if n.startswith("bn.")
        },
        weights=msl_weights(steps, iteration, 100).tolist(),
    )
    return meta, ref


def rel_err(a: dict, b: dict) -> float:
    """The relative global error of tree ``a`` against the reference ``b``, on ``b``'s device."""
    assert tree.structure(a) == tree.structure(b)
    a = tree.map(lambda x, y: x.to(y.device), a, b)
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


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
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
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
