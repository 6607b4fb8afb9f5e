"""Prototypical Networks and the pretrain-then-fine-tune baseline on Omniglot after a short
training run: 5-way 1-shot accuracy on 300 test episodes is far above chance (20%) and far above
the same network untrained.

Each test takes 15-25 s with OMP_NUM_THREADS=1 on the 2-core CPU. Images come from the decoded
cache (``$METAFUNC_CACHE`` or ``~/.cache/metafunc``); the first run on a machine decodes the PNGs
once (15-25 s more).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from metafunc import conv4, optim
from metafunc.algorithms import Algorithm, Baseline, ProtoNet
from metafunc.data import get_benchmark

pytestmark = [pytest.mark.data, pytest.mark.slow]

WAYS, QUERIES, EPISODES = 5, 5, 300


def accuracy(alg: Algorithm, meta: Any, sampler: Any, episodes: int, steps: int) -> float:
    """Mean query accuracy over a fixed set of test episodes (seed 0), after ``steps``."""
    accs = [
        alg.evaluate(meta, batch, steps)["accuracy"][:, -1]
        for batch in sampler.episodes(episodes, seed=0, batch_size=50)
    ]
    return float(torch.cat(accs).mean())


def test_protonet_beats_chance_after_100_training_episodes(data_root: Path) -> None:
    bench = get_benchmark("omniglot", data_root, ways=WAYS, shots=1, queries=QUERIES)
    train = bench.train.replace(ways=20)  # more ways in training than in testing, as the paper
    alg = ProtoNet(conv4(None), shots=1)
    gen = torch.Generator().manual_seed(0)
    meta = alg.init(gen)
    untrained = accuracy(alg, meta, bench.test, 100, steps=0)
    start, iterations = time.perf_counter(), 100
    opt = alg.outer_optimizer(1e-3, iterations)
    state = opt.init(meta)
    for i in range(iterations):
        grads, _, _ = alg.meta_grad(meta, train.sample(1, gen), iteration=i)
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
    trained_s = time.perf_counter() - start
    trained = accuracy(alg, meta, bench.test, EPISODES, steps=0)
    print(f"protonet: untrained {untrained:.3f}, trained {trained:.3f} in {trained_s:.1f} s")
    assert trained >= 0.65  # chance is 0.2; 0.73-0.74 measured over three seeds
    assert trained >= untrained + 0.2  # random conv4 embeddings already give ~0.37


def test_baseline_beats_chance_after_100_pretraining_steps(data_root: Path) -> None:
    bench = get_benchmark(
        "omniglot", data_root, ways=WAYS, shots=1, queries=QUERIES, rotations=(0,)
    )
    train = bench.train  # the 1,100 training characters, one class each
    alg = Baseline(
        conv4(None), num_train_classes=train.num_classes, feature_dim=64, shots=1, strategy="vmap"
    )  # each test task: a zero-initialised head, 100 Adam steps at 0.01 on frozen features
    gen = torch.Generator().manual_seed(0)
    meta = alg.init(gen)
    untrained = accuracy(alg, meta, bench.test, 100, steps=alg.inner_steps)
    start = time.perf_counter()
    opt = optim.adam(3e-3)
    state = opt.init(meta)
    for _ in range(100):
        grads, _, _ = alg.pretrain_grad(meta, *train.batch(128, gen))
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
    trained_s = time.perf_counter() - start
    trained = accuracy(alg, meta, bench.test, EPISODES, steps=alg.inner_steps)
    print(f"baseline: untrained {untrained:.3f}, trained {trained:.3f} in {trained_s:.1f} s")
    assert trained >= 0.55  # chance is 0.2; 0.67-0.69 measured over three seeds
    assert trained >= untrained + 0.15  # a fine-tuned head on random features gives ~0.38
