"""The JAX side of ``benchmarks/bench_jax.py``: the same MAML / Meta-SGD training step as
metafunc's, written the way a JAX user writes it (``jax.jit`` of the whole step, ``jax.vmap``
over tasks, ``jax.grad`` through the inner loop, optax's Adam), run under ``.jax-venv``.

    python benchmarks/jax/impl_jax.py --spec spec.json --inputs inputs.npz --out result.json

Reads the setting and the float64 parameters and check batch the driver wrote, writes the
float64 meta-gradient on that batch (``grads.npz`` beside ``--out``) and the float32 timing of
the whole step (tasks drawn inside it from a ``jax.random`` key).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)


def mlp_apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    """metafunc's ``mlp()``: 1-40-40-1 with ReLU; torch's ``[out, in]`` weight layout."""
    h = jax.nn.relu(x @ p["fc0.weight"].T + p["fc0.bias"])
    h = jax.nn.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def conv4_apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
    """metafunc's ``conv4(ways)`` for Omniglot: four 3x3 stride-2 convolutions, each followed by
    batch norm on the batch's statistics and ReLU, a spatial mean and a linear head."""
    for i in range(4):
        x = jax.lax.conv_general_dilated(
            x, p[f"conv{i}.weight"], (2, 2), ((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        ) + p[f"conv{i}.bias"][None, :, None, None]  # fmt: skip
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        x = (x - mean) / jnp.sqrt(var + 1e-5)
        x = x * p[f"bn{i}.weight"][None, :, None, None] + p[f"bn{i}.bias"][None, :, None, None]
        x = jax.nn.relu(x)
    return x.mean(axis=(2, 3)) @ p["head.weight"].T + p["head.bias"]


def make_loss(spec: dict[str, Any]) -> Any:
    regression = spec["model"] == "mlp"
    apply = mlp_apply if regression else conv4_apply

    def loss_of(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        out = apply(p, x)
        if regression:
            return jnp.mean((out - y) ** 2)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    def task_loss(meta: Any, task: tuple[jax.Array, ...]) -> jax.Array:
        sx, sy, qx, qy = task
        params = meta["params"]
        lr = meta.get("lr", spec["inner_lr"])
        for _ in range(spec["inner_steps"]):
            g = jax.grad(loss_of)(params, sx, sy)
            if isinstance(lr, dict):  # Meta-SGD: a rate per entry
                params = jax.tree.map(lambda w, r, gw: w - r * gw, params, lr, g)
            else:
                params = jax.tree.map(lambda w, gw: w - lr * gw, params, g)
        return loss_of(params, qx, qy)

    def meta_loss(meta: Any, batch: tuple[jax.Array, ...]) -> jax.Array:
        return jax.vmap(task_loss, in_axes=(None, 0))(meta, batch).mean()

    return meta_loss


def make_sampler(spec: dict[str, Any], bank: jax.Array | None, dtype: Any) -> Any:
    tasks = spec["tasks"]
    if spec["model"] == "mlp":
        n = spec["shots"] + spec["queries"]

        def sample(key: jax.Array) -> tuple[jax.Array, ...]:
            ka, kp, kx = jax.random.split(key, 3)
            amp = jax.random.uniform(ka, (tasks, 1, 1), dtype, 0.1, 5.0)
            phase = jax.random.uniform(kp, (tasks, 1, 1), dtype, 0.0, jnp.pi)
            x = jax.random.uniform(kx, (tasks, n, 1), dtype, -5.0, 5.0)
            y = amp * jnp.sin(x - phase)
            k = spec["shots"]
            return x[:, :k], y[:, :k], x[:, k:], y[:, k:]

        return sample
    assert bank is not None
    classes, examples = bank.shape[:2]
    ways, k, q = spec["ways"], spec["shots"], spec["queries"]

    def one(key: jax.Array) -> tuple[jax.Array, ...]:
        kc, ke = jax.random.split(key)
        ids = jax.random.choice(kc, classes, (ways,), replace=False)
        picks = jax.vmap(lambda kk: jax.random.choice(kk, examples, (k + q,), replace=False))(
            jax.random.split(ke, ways)
        )
        images = bank[ids[:, None], picks].astype(dtype) / 255.0  # [ways, k + q, 28, 28]
        sx = images[:, :k].reshape(ways * k, 1, 28, 28)
        qx = images[:, k:].reshape(ways * q, 1, 28, 28)
        labels = jnp.arange(ways)
        return sx, jnp.repeat(labels, k), qx, jnp.repeat(labels, q)

    def sample(key: jax.Array) -> tuple[jax.Array, ...]:
        return jax.vmap(one)(jax.random.split(key, tasks))

    return sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    data = dict(np.load(args.inputs))
    meta64 = {"params": {k[len("params.") :]: jnp.asarray(v) for k, v in data.items()
                         if k.startswith("params.")}}  # fmt: skip
    if spec["algorithm"] == "metasgd":
        meta64["lr"] = {k[len("lr.") :]: jnp.asarray(v) for k, v in data.items()
                        if k.startswith("lr.")}  # fmt: skip
    check = tuple(jnp.asarray(data[f"batch.{f}"]) for f in ("sx", "sy", "qx", "qy"))
    meta_loss = make_loss(spec)
    grads = jax.jit(jax.grad(meta_loss))(meta64, check)
    flat = {f"{group}.{k}": np.asarray(v) for group, tree in grads.items() for k, v in tree.items()}
    np.savez(Path(args.out).with_suffix(".grads.npz"), **flat)

    dtype = jnp.float32
    meta = jax.tree.map(lambda v: v.astype(dtype), meta64)
    bank = jnp.asarray(data["bank"]) if "bank" in data else None
    sample = make_sampler(spec, bank, dtype)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(meta: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array, Any]:
        key, sub = jax.random.split(key)
        loss, g = jax.value_and_grad(meta_loss)(meta, sample(sub))
        updates, opt_state = opt.update(g, opt_state, meta)
        return optax.apply_updates(meta, updates), opt_state, key, loss

    opt_state = opt.init(meta)
    key = jax.random.PRNGKey(0)
    start = time.perf_counter()
    meta, opt_state, key, loss = step(meta, opt_state, key)
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    per_round, rounds, budget = spec["iters"], spec["rounds"], spec["max_seconds"]
    times: list[float] = []
    began = time.perf_counter()
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            meta, opt_state, key, loss = step(meta, opt_state, key)
        loss.block_until_ready()
        times.append((time.perf_counter() - start) / per_round)
        if time.perf_counter() - began > budget and len(times) >= 2:
            break
    result = {
        "impl": "jax",
        "jax": jax.__version__,
        "optax": optax.__version__,
        "compile_s": round(compile_s, 3),
        "ms": round(1e3 * statistics.median(times), 4),
        "rounds": len(times),
        "iters_per_round": per_round,
        "final_loss": float(loss),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
