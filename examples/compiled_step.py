"""One training step as one compiled program: ``metafunc.compile_step``.

The step draws its tasks inside itself (MAML's sinusoid, from a counter-based key carried in
the state, as JAX carries a PRNG key), computes the second-order meta-gradient, applies the
outer Adam update and returns the metrics, all in one ``torch.compile(fullgraph=True)`` graph
with no host synchronisation. The state is one tree, ``StepState(meta, opt_state, key)``. The
script times the compiled step against the same step run eagerly (``step.eager``).

    python examples/compiled_step.py                        # compiles (tens of seconds)
    python examples/compiled_step.py --backend aot_eager    # traced whole, no code generation
    python examples/compiled_step.py --tiny                 # mode=None: the same step, eager
"""

import argparse
import time

import torch

import metafunc as mf
from metafunc.algorithms import MAML


def ms_per_step(step, state, iterations: int, start: int = 0):
    """Run ``iterations`` steps; return the final state and milliseconds per step."""
    begin = time.perf_counter()
    for it in range(start, start + iterations):
        state, metrics = step(state, iteration=it)
    if not bool(metrics["finite"]):  # a host sync, once, after the timed steps
        raise SystemExit(f"step {it}: the loss or the gradient is not finite")
    return state, 1e3 * (time.perf_counter() - begin) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="5 eager steps (mode=None)")
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    args = parser.parse_args()
    mode, iterations = (None, 5) if args.tiny else ("default", 500)

    alg = MAML(mf.mlp(), inner_lr=0.01, loss="mse")
    step = mf.compile_step(
        alg,
        mf.optim.adam(1e-3),
        sampler=mf.data.SinusoidTasks(shots=10),
        meta_batch=25,
        mode=mode,
        backend=args.backend,
    )
    state = step.init(alg.init(torch.Generator().manual_seed(0)), key=mf.data.keys.key(0))

    begin = time.perf_counter()  # the first call compiles; the second, once more, with the
    for it in range(2):  # iteration as a dynamic integer (torch.compile's automatic dynamic)
        state, metrics = step(state, iteration=it)
    seconds, loss = time.perf_counter() - begin, float(metrics["loss"])
    how = f"compiled ({args.backend})" if mode else "eager (mode=None)"
    print(f"{how}: first 2 steps {seconds:.1f} s; meta-loss {loss:.3f}")
    state, compiled_ms = ms_per_step(step, state, iterations, start=2)
    state, eager_ms = ms_per_step(step.eager, state, iterations, start=2 + iterations)
    print(f"{compiled_ms:.2f} ms per step {how}, {eager_ms:.2f} ms per step eager")

    test = mf.data.SinusoidTasks(shots=10).sample(100, torch.Generator().manual_seed(2))
    mse = alg.evaluate(state.meta, test, steps=1)["loss"].mean(0)
    print(
        f"after {2 + 2 * iterations} steps: query MSE {mse[0]:.3f} before adaptation, "
        f"{mse[1]:.3f} after 1 step"
    )


if __name__ == "__main__":
    main()
