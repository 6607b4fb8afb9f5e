"""EpisodeSampler: reproducibility, episode structure, rotations, label order, normalisation.

The images are synthetic "barcodes": every image states its class and example id in its pixels and
has a marker in one corner, so each sampled image can be traced back to its source (and rotation)
without trusting the sampler's bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from metafunc.data import ClassImages, EpisodeSampler, TaskBatch

MARK = 255


def barcodes(classes: int, examples: int, size: int = 5) -> torch.Tensor:
    """uint8 [classes, examples, 2, size, size]: channel 0 = class id, channel 1 = example id,
    and a MARK in the top-left corner of channel 0 that moves when the image is rotated."""
    c = torch.arange(classes, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, examples, size, size)
    e = torch.arange(examples, dtype=torch.uint8).view(1, -1, 1, 1).expand(classes, -1, size, size)
    images = torch.stack([c, e], dim=2).clone()
    images[:, :, 0, 0, 0] = MARK
    return images


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class id, example id and rotation angle of sampled images ``[..., 2, S, S]`` in [0, 1]."""
    u = (x * 255).round().to(torch.int64)
    mid = u.shape[-1] // 2
    cls, ex = u[..., 0, mid, mid], u[..., 1, mid, mid]
    corners = {0: (0, 0)}
    probe = torch.zeros(u.shape[-1], u.shape[-1])
    probe[0, 0] = 1
    for angle in (90, 180, 270):
        where = torch.rot90(probe, angle // 90, dims=(0, 1)).nonzero()[0].tolist()
        corners[angle] = (where[0], where[1])
    angle = torch.full_like(cls, -1)
    for a, (i, j) in corners.items():
        angle[u[..., 0, i, j] == MARK] = a
    assert bool((angle >= 0).all()), "every image carries exactly one corner marker"
    return cls, ex, angle


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(a: TaskBatch, b: TaskBatch) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_shapes_dtypes_and_grey_input() -> None:
    grey = torch.randint(0, 256, (12, 8, 7, 9), dtype=torch.uint8, generator=seeded(0))
    sampler = EpisodeSampler(grey, ways=4, shots=2, queries=3)
    batch = sampler.sample(6, seeded(1))
    assert batch.support_x.shape == (6, 8, 1, 7, 9) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (6, 12, 1, 7, 9)
    assert batch.support_y.shape == (6, 8) and batch.support_y.dtype == torch.int64
    assert batch.query_y.shape == (6, 12) and batch.query_y.dtype == torch.int64
    assert float(batch.support_x.min()) >= 0.0 and float(batch.support_x.max()) <= 1.0
    double = sampler.replace(dtype=torch.float64).sample(6, seeded(1))
    assert double.query_x.dtype == torch.float64
    torch.testing.assert_close(double.query_x.float(), batch.query_x)


def test_same_seed_same_episodes_different_seed_different() -> None:
    sampler = EpisodeSampler(barcodes(30, 10), ways=5, shots=1, queries=3, rotations=(0, 90))
    assert_same(sampler.sample(16, seeded(7)), sampler.sample(16, seeded(7)))
    a, b = sampler.sample(16, seeded(7)), sampler.sample(16, seeded(8))
    assert not torch.equal(a.support_x, b.support_x)
    # A fresh sampler on the same data (as in another run) draws the same episodes.
    again = EpisodeSampler(barcodes(30, 10), ways=5, shots=1, queries=3, rotations=(0, 90))
    assert_same(again.sample(16, seeded(7)), a)


@pytest.mark.parametrize(
    ("classes", "ways", "rotations"),
    [(40, 5, (0,)), (6, 5, (0,)), (3, 10, (0, 90, 180, 270)), (200, 20, (0, 90, 180, 270))],
)
def test_episode_structure(classes: int, ways: int, rotations: tuple[int, ...]) -> None:
    shots, queries, examples = 2, 3, 7
    sampler = EpisodeSampler(
        barcodes(classes, examples), ways=ways, shots=shots, queries=queries, rotations=rotations
    )
    batch, ids = sampler.sample_with_classes(24, seeded(3))
    s_cls, s_ex, s_rot = decode(batch.support_x)
    q_cls, q_ex, q_rot = decode(batch.query_x)
    for t in range(24):
        # Balanced labels: each of 0..N-1 appears K times in support and Q times in query.
        assert torch.equal(
            torch.bincount(batch.support_y[t], minlength=ways), torch.full((ways,), shots)
        )
        assert torch.equal(
            torch.bincount(batch.query_y[t], minlength=ways), torch.full((ways,), queries)
        )
        pairs = set()
        for n in range(ways):
            s, q = batch.support_y[t] == n, batch.query_y[t] == n
            source = {
                (c, r) for c, r in zip(s_cls[t][s].tolist(), s_rot[t][s].tolist(), strict=True)
            }
            source |= {
                (c, r) for c, r in zip(q_cls[t][q].tolist(), q_rot[t][q].tolist(), strict=True)
            }
            assert len(source) == 1, "one label, one (class, rotation)"
            pair = source.pop()
            pairs.add(pair)
            expected = int(ids[t, n])
            assert pair == (expected % classes, rotations[expected // classes])
            support_ex, query_ex = s_ex[t][s].tolist(), q_ex[t][q].tolist()
            assert len(set(support_ex + query_ex)) == shots + queries, "support/query disjoint"
        assert len(pairs) == ways, "the N classes of a task are distinct (class, rotation) pairs"
    assert set(s_rot.unique().tolist()) == set(rotations)


@pytest.mark.parametrize("classes", [5, 200])
def test_label_order_is_random_per_task(classes: int) -> None:
    sampler = EpisodeSampler(barcodes(classes, 4), ways=5, shots=1, queries=1)
    batch, ids = sampler.sample_with_classes(400, seeded(11))
    cls, _, _ = decode(batch.support_x)
    assert torch.equal(cls, ids)
    orders = {tuple(row) for row in ids.argsort(dim=1).tolist()}
    assert len(orders) > 60, "label order differs across tasks"
    if classes == 5:  # every task uses all 5 classes: each label takes each class ~80 times
        table = torch.zeros(5, 5, dtype=torch.int64)
        for label in range(5):
            table[label] = torch.bincount(ids[:, label], minlength=5)
        assert int(table.min()) > 45 and int(table.max()) < 120, table


@pytest.mark.parametrize(("classes", "ways"), [(50, 5), (6, 5)])
def test_classes_are_drawn_uniformly(classes: int, ways: int) -> None:
    sampler = EpisodeSampler(barcodes(classes, 3), ways=ways, shots=1, queries=0)
    _, ids = sampler.sample_with_classes(3000, seeded(5))
    freq = torch.bincount(ids.reshape(-1), minlength=classes).double()
    expected = 3000 * ways / classes
    assert float((freq - expected).abs().max()) < 6 * expected**0.5, freq


def test_examples_respect_ragged_counts() -> None:
    images = barcodes(8, 10)
    counts = torch.tensor([10, 4, 5, 4, 10, 6, 4, 7])
    for c, n in enumerate(counts.tolist()):
        images[c, n:] = 77  # padding that must never be drawn
    sampler = EpisodeSampler(
        ClassImages(images, tuple("abcdefgh"), counts), ways=3, shots=1, queries=3
    )
    batch = sampler.sample(500, seeded(2))
    for x in (batch.support_x, batch.query_x):
        cls, ex, _ = decode(x)
        assert bool((ex < counts[cls]).all())
    used = decode(batch.query_x)[1][decode(batch.query_x)[0] == 0]
    assert set(used.tolist()) == set(range(10)), "a full class uses all its examples"


def test_normalisation_per_channel() -> None:
    images = torch.randint(0, 256, (10, 6, 3, 4, 4), dtype=torch.uint8, generator=seeded(0))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    plain = EpisodeSampler(images, ways=3, shots=1, queries=2).sample(4, seeded(9))
    normed = EpisodeSampler(images, ways=3, shots=1, queries=2, mean=mean, std=std).sample(
        4, seeded(9)
    )
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(normed.support_x, (plain.support_x - m) / s)
    torch.testing.assert_close(normed.query_x, (plain.query_x - m) / s)
    # The plain values are exactly the source bytes / 255.
    u = (plain.support_x * 255).round().to(torch.uint8)
    assert bool(torch.isin(u.flatten(), images.flatten()).all())


def test_episodes_fixed_and_independent_of_batch_size() -> None:
    sampler = EpisodeSampler(barcodes(20, 8), ways=5, shots=1, queries=2, rotations=(0, 180))
    first = list(sampler.episodes(70, seed=3, batch_size=32))
    assert [b.num_tasks for b in first] == [32, 32, 6]
    again = list(sampler.episodes(70, seed=3, batch_size=32))
    for a, b in zip(first, again, strict=True):
        assert_same(a, b)
    whole = next(iter(sampler.episodes(70, seed=3, batch_size=70)))
    stitched = TaskBatch(*(torch.cat(parts) for parts in zip(*first, strict=True)))
    assert_same(whole, stitched)
    other = next(iter(sampler.episodes(70, seed=4, batch_size=70)))
    assert not torch.equal(other.support_x, whole.support_x)


def test_bad_arguments_raise_clear_errors() -> None:
    images = barcodes(6, 5)
    with pytest.raises(ValueError, match=r"EpisodeSampler.*ways=7.*only 6 classes.*ways <= 6"):
        EpisodeSampler(images, ways=7, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"EpisodeSampler.*shots \+ queries.*6.*only 5 examples"):
        EpisodeSampler(images, ways=2, shots=1, queries=5)
    with pytest.raises(TypeError, match=r"EpisodeSampler.*uint8.*torch.float32"):
        EpisodeSampler(images.float(), ways=2, shots=1, queries=1)
    with pytest.raises(ValueError, match=r"rotations=\(0, 45\).*multiples of 90"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, rotations=(0, 45))
    with pytest.raises(ValueError, match=r"rotating 3x4 images"):
        EpisodeSampler(images[..., :3, :4], ways=2, shots=1, queries=1, rotations=(0, 90))
    with pytest.raises(ValueError, match=r"mean has 3 values.*2 channel"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match=r"shots=0"):
        EpisodeSampler(images, ways=2, shots=0, queries=1)
    sampler = EpisodeSampler(images, ways=2, shots=1, queries=1)
    with pytest.raises(TypeError, match=r"EpisodeSampler.sample.*torch.Generator"):
        sampler.sample(4, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"EpisodeSampler.sample.*num_tasks=0"):
        sampler.sample(0, seeded(0))
    with pytest.raises(TypeError, match=r"replace.*unknown.*'way'"):
        sampler.replace(way=3)
    assert sampler.replace(ways=6).sample(2, seeded(0)).support_y.shape == (2, 6)


def test_rotated_class_names() -> None:
    data = ClassImages(barcodes(2, 3), ("a", "b"))
    sampler = EpisodeSampler(data, ways=2, shots=1, queries=1, rotations=(0, 90))
    assert sampler.classes == ("a", "b", "a@rot90", "b@rot90")
    assert sampler.num_classes == 4
    sizes = [batch.num_tasks for batch in sampler.episodes(5, seed=0, batch_size=2)]
    assert sizes == [2, 2, 1]


def test_uint8_and_float_storage_give_identical_batches() -> None:
    images = torch.randint(0, 256, (9, 6, 3, 5, 5), dtype=torch.uint8, generator=seeded(4))
    options = dict(
        ways=4, shots=2, queries=3, rotations=(0, 90, 270), mean=0.4, std=(0.2, 0.3, 0.5)
    )
    as_bytes = EpisodeSampler(images, storage="uint8", **options)  # type: ignore[arg-type]
    as_float = EpisodeSampler(images, storage="float", **options)  # type: ignore[arg-type]
    auto = EpisodeSampler(images, **options)  # type: ignore[arg-type]
    assert as_bytes.stored_dtype == torch.uint8 and as_float.stored_dtype == torch.float32
    assert auto.stored_dtype == torch.float32, "a small set is normalised once under 'auto'"
    assert_same(as_bytes.sample(10, seeded(1)), as_float.sample(10, seeded(1)))
    assert_same(as_bytes.sample(10, seeded(1)), auto.sample(10, seeded(1)))
    with pytest.raises(ValueError, match=r"storage='half'; use 'auto', 'uint8' or 'float'"):
        EpisodeSampler(images, ways=2, shots=1, queries=1, storage="half")


@pytest.mark.gpu
def test_cuda_sampler_matches_cpu() -> None:
    images = barcodes(40, 8)
    options = dict(ways=5, shots=1, queries=3, rotations=(0, 90, 180, 270))
    cpu = EpisodeSampler(images, **options)  # type: ignore[arg-type]
    gpu = EpisodeSampler(images, device="cuda", **options)  # type: ignore[arg-type]
    a, b = cpu.sample(16, seeded(3)), gpu.sample(16, seeded(3))
    assert b.support_x.device.type == "cuda" and b.query_y.device.type == "cuda"
    assert_same(a, b.to("cpu"))
    first = next(iter(gpu.episodes(20, seed=1, batch_size=20)))
    assert_same(next(iter(cpu.episodes(20, seed=1, batch_size=20))), first.to("cpu"))


@pytest.mark.parametrize("storage", ["uint8", "float"])
def test_pretraining_batches_trace_back_to_their_class(storage: str) -> None:
    counts = torch.tensor([4, 2, 4])
    data = ClassImages(barcodes(3, 4), ("a", "b", "c"), counts)
    sampler = EpisodeSampler(data, ways=2, shots=1, queries=1, rotations=(0, 90), storage=storage)
    x, y = sampler.batch(20, seeded(3))  # 2 x (4 + 2 + 4) real images: all of them
    cls, ex, angle = decode(x)
    assert torch.equal(y, (angle // 90) * 3 + cls)  # the id of sample_with_classes
    assert bool((ex < counts[cls]).all())  # never a zero-padded slot
    assert len({(int(c), int(e), int(a)) for c, e, a in zip(cls, ex, angle, strict=True)}) == 20
    again, _ = sampler.batch(20, seeded(3))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match=r"EpisodeSampler.batch.*must lie in \[1, 20\]"):
        sampler.batch(21, seeded(0))
