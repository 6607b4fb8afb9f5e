"""get_benchmark: names, sinusoid, options and root errors (image benchmarks: own files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metafunc.data import Benchmark, SinusoidTasks, benchmark_names, get_benchmark


def test_names_and_unknown_name() -> None:
    names = benchmark_names()
    expected = {"sinusoid", "omniglot", "omniglot-lake", "mini-imagenet", "cifar-fs", "folder"}
    assert expected <= set(names)
    with pytest.raises(
        ValueError, match=r"get_benchmark: unknown benchmark 'omniglott'.*'omniglot'.*'cifar-fs'"
    ) as info:
        get_benchmark("omniglott")
    assert all(repr(n) in str(info.value) for n in names)


def test_sinusoid_benchmark() -> None:
    bench = get_benchmark("sinusoid", shots=5, dtype=torch.float64)
    assert isinstance(bench, Benchmark) and isinstance(bench.train, SinusoidTasks)
    batch = bench.train.sample(3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 5, 1) and batch.query_x.shape == (3, 5, 1)
    assert batch.support_x.dtype == torch.float64
    custom = get_benchmark("sinusoid", shots=2, queries=4, amplitude=(1.0, 1.0), phase=(0.0, 0.0))
    batch = custom.test.sample(2, torch.Generator().manual_seed(0))
    assert batch.query_x.shape == (2, 4, 1)
    torch.testing.assert_close(batch.query_y, torch.sin(batch.query_x))
    with pytest.raises(
        ValueError, match=r"get_benchmark\('sinusoid'\).*no classes; leave ways out"
    ):
        get_benchmark("sinusoid", ways=5)


def test_unknown_option_and_missing_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(
        TypeError,
        match=r"get_benchmark\('sinusoid'\): unknown option\(s\) \['rotations'\].*'amplitude'",
    ):
        get_benchmark("sinusoid", rotations=(0, 90))
    with pytest.raises(
        TypeError, match=r"get_benchmark\('cifar-fs'\): unknown option\(s\) \['image_size'\]"
    ):
        get_benchmark("cifar-fs", tmp_path, image_size=32)
    monkeypatch.delenv("METAFUNC_DATA", raising=False)
    with pytest.raises(
        ValueError, match=r"get_benchmark\('omniglot'\): no data folder; pass root=.*METAFUNC_DATA"
    ):
        get_benchmark("omniglot")
    with pytest.raises(ValueError, match=r"get_benchmark\('folder'\): pass root=.*split="):
        get_benchmark("folder", tmp_path)
    monkeypatch.setenv("METAFUNC_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"images_evaluation.zip"):
        get_benchmark("omniglot", cache_dir=tmp_path / "cache")
