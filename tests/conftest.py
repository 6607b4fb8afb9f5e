"""Shared fixtures: seeded generators, intra-op threads, the device a test runs on, the shared data
root."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch

# The test models are tiny: one intra-op thread is faster than several, and immune to the
# spin-waiting that makes OpenMP crawl when another process holds a core.
torch.set_num_threads(int(os.environ.get("METAFUNC_TEST_THREADS", "1")))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def intra_op_threads() -> Callable[[int], AbstractContextManager[None]]:
    """``with intra_op_threads(n):`` runs a block on ``n`` intra-op threads (the suite runs on
    one), restoring the count after."""
    return _threads


@pytest.fixture
def two_intra_op_threads() -> Iterator[None]:
    """Two intra-op threads for the test, so that the ``'threads'`` strategy runs tasks
    concurrently on any machine (``pytestmark = pytest.mark.usefixtures(...)`` for a module)."""
    with _threads(2):
        yield


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed, so every test is reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """The device a test runs on: ``'cpu'``, then ``'cuda'`` (marked ``gpu``, so ``-m gpu``
    selects it), which skips with a reason where CUDA is not available. A test builds its data
    and parameters on the CPU and moves them with ``helpers.to(device, ...)``; its references
    stay on the CPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch.cuda.is_available() is False")
    return request.param


@pytest.fixture
def data_root() -> Path:
    """The shared data folder from ``METAFUNC_DATA``.

    Without it the test skips with a reason, except under CI (``CI=true``), where it must run.
    """
    value = os.environ.get("METAFUNC_DATA")
    if not value:
        if os.environ.get("CI"):
            pytest.fail("METAFUNC_DATA is not set under CI; .ci/run must export it")
        pytest.skip("METAFUNC_DATA is not set; point it at the folder holding omniglot-py/")
    root = Path(value)
    if not (root / "omniglot-py").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"METAFUNC_DATA={value} has no omniglot-py/ folder")
        pytest.skip(f"METAFUNC_DATA={value} has no omniglot-py/ folder")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
