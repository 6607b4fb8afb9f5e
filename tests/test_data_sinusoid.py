"""SinusoidTasks: MAML's sinusoid distribution, shapes, reproducibility and the true functions."""

from __future__ import annotations

import math

import pytest
import torch

from metafunc.data import SinusoidTasks, TaskBatch, sinusoid


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_and_dtypes() -> None:
    batch = SinusoidTasks(shots=5, queries=7).sample(4, seeded(0))
    assert batch.support_x.shape == batch.support_y.shape == (4, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (4, 7, 1)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in batch)
    double = SinusoidTasks(shots=3, dtype=torch.float64).sample(2, seeded(0))
    assert all(t.dtype == torch.float64 for t in double)
    assert double.query_x.shape == (2, 3, 1), "queries default to shots, as in MAML"


def test_targets_are_the_sinusoids_of_the_returned_params() -> None:
    batch, params = SinusoidTasks(shots=4).sample_with_params(6, seeded(1))
    for t in range(6):
        a, phi = float(params.amplitude[t]), float(params.phase[t])
        for x, y in (
            (batch.support_x[t], batch.support_y[t]),
            (batch.query_x[t], batch.query_y[t]),
        ):
            expected = torch.tensor([[a * math.sin(float(v) - phi)] for v in x[:, 0]])
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grid = torch.linspace(-5, 5, 11)
    curve = params.evaluate(grid)
    assert curve.shape == (6, 11, 1)
    torch.testing.assert_close(
        curve[2, 3, 0], params.amplitude[2] * torch.sin(grid[3] - params.phase[2])
    )
    torch.testing.assert_close(sinusoid(grid, params.amplitude, params.phase), curve)


def test_distribution_matches_maml() -> None:
    batch, params = SinusoidTasks(shots=10).sample_with_params(20000, seeded(2))
    a, phi, x = params.amplitude, params.phase, torch.cat([batch.support_x, batch.query_x], 1)
    for values, low, high in ((a, 0.1, 5.0), (phi, 0.0, math.pi), (x, -5.0, 5.0)):
        assert float(values.min()) >= low and float(values.max()) <= high
        width = high - low
        assert (
            float(values.min()) < low + 0.01 * width and float(values.max()) > high - 0.01 * width
        )
        # Uniform: the mean and the deciles match U[low, high].
        assert abs(float(values.mean()) - (low + high) / 2) < 0.02 * width
        deciles = torch.quantile(
            values.flatten()[:100000].double(), torch.linspace(0.1, 0.9, 9).double()
        )
        torch.testing.assert_close(
            deciles, low + width * torch.linspace(0.1, 0.9, 9).double(), atol=0.02 * width, rtol=0
        )
    # Support and query inputs are independent draws, not copies.
    assert not torch.equal(batch.support_x, batch.query_x)


def test_custom_ranges() -> None:
    tasks = SinusoidTasks(shots=2, amplitude=(1.0, 1.0), phase=(0.5, 0.5), x_range=(0.0, 1.0))
    batch, params = tasks.sample_with_params(3, seeded(0))
    assert torch.equal(params.amplitude, torch.ones(3)) and torch.equal(
        params.phase, torch.full((3,), 0.5)
    )
    assert float(batch.support_x.min()) >= 0.0 and float(batch.support_x.max()) <= 1.0
    torch.testing.assert_close(batch.support_y, torch.sin(batch.support_x - 0.5))


def test_reproducible_by_seed_and_fixed_episodes() -> None:
    tasks = SinusoidTasks(shots=5)
    a, b, c = tasks.sample(8, seeded(3)), tasks.sample(8, seeded(3)), tasks.sample(8, seeded(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.support_x, c.support_x)
    first = list(tasks.episodes(100, seed=9, batch_size=32))
    assert [e.num_tasks for e in first] == [32, 32, 32, 4]
    again = TaskBatch(
        *(torch.cat(p) for p in zip(*tasks.episodes(100, seed=9, batch_size=7), strict=True))
    )
    whole = TaskBatch(*(torch.cat(p) for p in zip(*first, strict=True)))
    assert all(torch.equal(x, y) for x, y in zip(whole, again, strict=True))
    other = next(iter(tasks.episodes(100, seed=10, batch_size=100)))
    assert not torch.equal(other.support_x, whole.support_x)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"SinusoidTasks.*shots=0"):
        SinusoidTasks(shots=0)
    with pytest.raises(ValueError, match=r"SinusoidTasks.*amplitude=\(5.0, 0.1\).*low <= high"):
        SinusoidTasks(amplitude=(5.0, 0.1))
    with pytest.raises(TypeError, match=r"SinusoidTasks.*dtype=torch.int64"):
        SinusoidTasks(dtype=torch.int64)
    with pytest.raises(TypeError, match=r"SinusoidTasks.sample.*torch.Generator"):
        SinusoidTasks().sample(3, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SinusoidTasks.episodes.*count=0"):
        SinusoidTasks().episodes(0, seed=0)
