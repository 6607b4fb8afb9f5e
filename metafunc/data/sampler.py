"""N-way K-shot episodes drawn from a class-indexed uint8 image tensor, a meta-batch at a time.

The images stay on the target device as uint8. A meta-batch of ``T`` tasks costs a handful of
tensor ops, whatever ``T``: draw ``T x N`` distinct classes, draw ``K + Q`` distinct examples of
each, gather the support and query images with one ``index_select`` each, and convert them to
float on the device. No Python loop runs per task and no DataLoader is involved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from metafunc.data import keys
from metafunc.data.batch import TaskBatch
from metafunc.data.dataset import ClassImages

__all__ = ["AUGMENTATIONS", "EpisodeSampler", "TaskSampler", "distort"]

AUGMENTATIONS = ("none", "affine", "elastic")

# storage="auto"'s cap on the float copy, bytes: speed vs memory, HISTORY "sampler float storage"
_FLOAT_LIMIT = 512 << 20


class TaskSampler(Protocol):
    """Anything that draws meta-batches of tasks: :class:`EpisodeSampler`, ``SinusoidTasks``."""

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch: ...

    def episodes(self, count: int, seed: int, batch_size: int = 32) -> Iterator[TaskBatch]: ...


def check_generator(generator: Any, *, call: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{call}: generator is {type(generator).__name__}, not a torch.Generator. Pass one, "
            "e.g. generator=torch.Generator().manual_seed(0); metafunc never uses the global RNG."
        )
    return generator


def check_episodes_args(count: int, batch_size: int, *, call: str) -> None:
    if count < 1 or batch_size < 1:
        raise ValueError(
            f"{call}: count={count} and batch_size={batch_size} must both be at least 1."
        )


def check_num_tasks(num_tasks: int, *, call: str) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"{call}: num_tasks={num_tasks!r}; pass a positive int.")


class EpisodeSampler:
    """Draws N-way K-shot Q-query classification tasks from images grouped by class.

    Each task picks ``ways`` distinct classes (a class is a ``(class, rotation)`` pair when
    ``rotations`` has several angles), labels them ``0..ways-1`` in a random order of its own, and
    picks ``shots + queries`` distinct examples of each class: the first ``shots`` form the
    support set, the rest the query set, so support and query never share an image. Images are
    converted on the device to ``dtype`` in ``[0, 1]`` (``x / 255``), then ``(x - mean) / std``
    per channel when ``mean``/``std`` are given.

    Args:
        images: uint8 ``[classes, examples, H, W]`` or ``[classes, examples, C, H, W]``, or a
            :class:`ClassImages` (which carries class names and per-class example counts).
        ways, shots, queries: N, K and Q.
        rotations: angles in degrees, multiples of 90; every class yields one new class per angle
            (Omniglot's augmentation: ``(0, 90, 180, 270)`` multiplies the classes by four). The
            rotated copies are made once, on the device, so memory grows by ``len(rotations)``.
        mean, std: per-channel statistics in ``[0, 1]`` units (a float applies to every channel).
        counts: int64 ``[classes]`` real examples per class, if the tensor is zero-padded.
        device: where images and batches live (default: the images' device).
        dtype: floating dtype of the returned images.
        augment: ``"affine"`` distorts every image of :meth:`sample` by its own random affine
            map (rotation ±10°, shear ±0.3, scale 0.8-1.2 per axis, shift ±2/28 of the side, as
            Koch et al.'s Siamese networks and Lake et al.'s strokes are distorted): new drawings
            of the same character for training; ``"elastic"`` adds Simard et al.'s elastic
            deformation to each map (:func:`distort`); ``"none"`` (default). :meth:`episodes`, the
            evaluation episodes, are never distorted.
        storage: ``"uint8"`` keeps the images as bytes and normalises each batch after the gather;
            ``"float"`` normalises all images once, so a batch is a single gather (faster, at
            4x the memory for float32; HISTORY "sampler float storage"); ``"auto"`` (default)
            picks ``"float"`` when that copy takes at most 512 MiB (e.g. Omniglot), else
            ``"uint8"``. Batches are bitwise identical either way.

    Output of :meth:`sample`: ``TaskBatch`` with ``support_x [T, N*K, C, H, W]``, ``support_y
    [T, N*K]`` int64, ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``; examples are grouped
    by label (``support_y[t] == [0]*K + [1]*K + ...``).

    Example:
        >>> sampler = EpisodeSampler(images, ways=5, shots=1, queries=15)
        >>> batch = sampler.sample(32, torch.Generator().manual_seed(0))
        >>> for batch in sampler.episodes(600, seed=1, batch_size=50): ...
    """

    def __init__(
        self,
        images: torch.Tensor | ClassImages,
        *,
        ways: int,
        shots: int,
        queries: int,
        rotations: Sequence[int] = (0,),
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        counts: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        storage: str = "auto",
        augment: str = "none",
    ) -> None:
        call = "EpisodeSampler(...)"
        names: tuple[str, ...] | None = None
        if isinstance(images, ClassImages):
            if counts is not None and images.counts is not None:
                raise ValueError(f"{call}: counts is given twice (argument and ClassImages).")
            names, counts = images.classes, images.counts if counts is None else counts
            images = images.images
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(
                f"{call}: images must be a uint8 tensor, got {kind}. Convert 0..1 floats with "
                "(x * 255).round().to(torch.uint8)."
            )
        if images.ndim == 4:
            images = images.unsqueeze(2)
        if images.ndim != 5:
            raise ValueError(
                f"{call}: images has shape {tuple(images.shape)}; expected [classes, examples, "
                "H, W] or [classes, examples, C, H, W]."
            )
        for arg, value, least in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{call}: {arg}={value!r}; pass an int >= {least}.")
        if not dtype.is_floating_point:
            raise TypeError(f"{call}: dtype={dtype} is not floating; use e.g. torch.float32.")
        if storage not in ("auto", "uint8", "float"):
            raise ValueError(f"{call}: storage={storage!r}; use 'auto', 'uint8' or 'float'.")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"{call}: augment={augment!r}; use one of {AUGMENTATIONS}.")
        base, examples, channels, height, width = images.shape
        angles = check_rotations(rotations, height, width, call=call)
        total = base * len(angles)
        if ways > total:
            raise ValueError(
                f"{call}: ways={ways} but only {total} classes are available ({base} classes x "
                f"{len(angles)} rotation(s)); use ways <= {total}, or add classes or rotations."
            )
        if counts is not None:
            counts = torch.as_tensor(counts, dtype=torch.int64).cpu()
            if counts.shape != (base,) or bool((counts > examples).any()):
                raise ValueError(
                    f"{call}: counts must be [{base}] ints <= {examples} (examples per class)."
                )
        per_class = counts if counts is not None else torch.full((base,), examples)
        fewest = int(per_class.min())
        if shots + queries > fewest:
            worst = int(per_class.argmin())
            label = names[worst] if names is not None else f"#{worst}"
            raise ValueError(
                f"{call}: shots + queries = {shots} + {queries} = {shots + queries} but class "
                f"{label} has only {fewest} examples; use shots + queries <= {fewest}, or drop "
                "classes with few examples."
            )
        device = torch.device(device) if device is not None else images.device
        scale, shift = _normalisation(mean, std, channels, dtype, device, call=call)

        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotations = angles
        self.base_classes = names if names is not None else tuple(str(i) for i in range(base))
        self.device, self.dtype = device, dtype
        self.mean, self.std, self.storage, self.augment = mean, std, storage, augment
        self._source = images
        self._examples = int(examples)
        self._image_shape = (int(channels), int(height), int(width))
        self._counts = None if counts is None else counts.repeat(len(angles))
        # rows of real (not zero-padded) examples, on the device, for plain batches
        self._valid_rows = (
            None
            if self._counts is None
            else (torch.arange(examples) < self._counts[:, None])
            .flatten()
            .nonzero()[:, 0]
            .to(device)
        )
        self._scale, self._shift = scale, shift
        self._accept = math.prod(1.0 - i / total for i in range(ways))
        images = images.to(device)
        rotated = [torch.rot90(images, k=a // 90, dims=(-2, -1)) if a else images for a in angles]
        data = rotated[0] if len(rotated) == 1 else torch.cat(rotated)
        data = data.reshape(total * examples, channels, height, width)
        float_bytes = data.numel() * dtype.itemsize
        self._normalised = storage == "float" or (storage == "auto" and float_bytes <= _FLOAT_LIMIT)
        self._data = self._normalise(data) if self._normalised else data

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the images are kept in: ``torch.uint8`` as given, or the float dtype they
        were normalised to once (``storage='float'``, or ``'auto'`` for a set that fits)."""
        return self._data.dtype

    @property
    def num_classes(self) -> int:
        """Classes to draw from: base classes times rotations."""
        return len(self.base_classes) * len(self.rotations)

    @property
    def classes(self) -> tuple[str, ...]:
        """Names of the class ids of :meth:`sample_with_classes` (``rotation * base + class``)."""
        return tuple(
            name if angle == 0 else f"{name}@rot{angle}"
            for angle in self.rotations
            for name in self.base_classes
        )

    def replace(self, **changes: Any) -> EpisodeSampler:
        """A new sampler over the same images with some arguments changed, e.g. ``ways=20``."""
        args: dict[str, Any] = dict(
            ways=self.ways, shots=self.shots, queries=self.queries, rotations=self.rotations,
            mean=self.mean, std=self.std, device=self.device, dtype=self.dtype,
            storage=self.storage, augment=self.augment,
        )  # fmt: skip
        unknown = sorted(set(changes) - set(args))
        if unknown:
            raise TypeError(
                f"EpisodeSampler.replace: unknown argument(s) {unknown}; use {list(args)}."
            )
        args.update(changes)
        counts = None if self._counts is None else self._counts[: len(self.base_classes)]
        data = ClassImages(self._source, self.base_classes, counts)
        return EpisodeSampler(data, **args)

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks drawn with ``generator`` (see the class docs)."""
        return self.sample_with_classes(num_tasks, generator)[0]

    def sample_with_classes(
        self, num_tasks: int, generator: torch.Generator
    ) -> tuple[TaskBatch, torch.Tensor]:
        """Like :meth:`sample`, also returning the class ids ``[T, N]``: label ``n`` of task ``t``
        is class ``ids[t, n]``, i.e. base class ``id % len(base_classes)`` rotated by
        ``rotations[id // len(base_classes)]`` (names in :attr:`classes`)."""
        call = "EpisodeSampler.sample"
        check_num_tasks(num_tasks, call=call)
        check_generator(generator, call=call)
        ids, rows = self._draw(num_tasks, generator)
        return self.augmented(self.gather(rows), generator), ids

    def sample_keyed(self, num_tasks: int, key: torch.Tensor) -> TaskBatch:
        """A meta-batch of ``num_tasks`` tasks drawn from ``key`` (:mod:`metafunc.data.keys`):
        pure tensor operations on the sampler's device, so it runs inside a compiled training
        step (:func:`metafunc.compile_step`). Classes are the ``ways`` largest of uniform keys
        over every class, examples the ``shots + queries`` largest over a class's examples: the
        distribution of :meth:`sample`, not its tasks."""
        device = key.device
        class_keys = keys.uniform(keys.split(key, 2)[0], (num_tasks, self.num_classes))
        ids = class_keys.to(device).topk(self.ways, dim=1).indices
        shape = (num_tasks, self.ways, self._examples)
        example_keys = keys.uniform(keys.split(key, 2)[1], shape).to(device)
        if self._counts is not None:
            real = self._counts.to(device)[ids].unsqueeze(-1)
            fill = torch.arange(self._examples, device=device) >= real
            example_keys = example_keys.masked_fill(fill, -1.0)
        picks = example_keys.topk(self.shots + self.queries, dim=-1).indices
        return self.gather(ids.unsqueeze(-1) * self._examples + picks)

    def episodes(self, count: int, seed: int, batch_size: int = 32) -> Iterator[TaskBatch]:
        """A fixed evaluation set: ``count`` tasks drawn from ``seed``, ``batch_size`` at a time.

        Every call with the same ``seed`` yields the same tasks on any device, and the tasks do
        not depend on ``batch_size`` (the last batch may be smaller).
        """
        check_episodes_args(count, batch_size, call="EpisodeSampler.episodes")
        _, rows = self._draw(count, torch.Generator().manual_seed(seed))
        return (self.gather(rows[i : i + batch_size]) for i in range(0, count, batch_size))

    def batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain classification batch for pretraining: ``batch_size`` distinct images drawn
        uniformly from every class (rotations included), normalised like :meth:`sample`, and
        their class ids ``[batch_size]`` int64 (the ids of :meth:`sample_with_classes`)."""
        call = "EpisodeSampler.batch(batch_size, generator)"
        check_generator(generator, call=call)
        valid = self._valid_rows
        total = self.num_classes * self._examples if valid is None else len(valid)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise ValueError(f"{call}: batch_size={batch_size!r}; pass an int in [1, {total}].")
        if not 1 <= batch_size <= total:
            raise ValueError(f"{call}: batch_size={batch_size} must lie in [1, {total}].")
        rows = torch.randperm(total, generator=generator, device=generator.device)[:batch_size]
        rows = rows.to(self.device, non_blocking=True)
        if valid is not None:
            rows = valid[rows]
        x = self._data.index_select(0, rows)
        if not self._normalised:
            x = self._normalise(x)
        return x, rows // self._examples

    def _draw(
        self, num_tasks: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids ``[T, N]`` and image rows ``[T, N, K + Q]`` into ``self._data``."""
        device = generator.device
        ids = _distinct(num_tasks, self.num_classes, self.ways, self._accept, generator)
        keys = torch.rand(num_tasks, self.ways, self._examples, generator=generator, device=device)
        if self._counts is not None:
            real = self._counts.to(device)[ids].unsqueeze(-1)
            keys.masked_fill_(torch.arange(self._examples, device=device) >= real, -1.0)
        picks = keys.topk(self.shots + self.queries, dim=-1).indices
        return ids, ids.unsqueeze(-1) * self._examples + picks

    def augmented(self, batch: TaskBatch, generator: torch.Generator) -> TaskBatch:
        """``batch`` with the sampler's ``augment`` applied to its images (drawn with
        ``generator``): training batches, never :meth:`episodes`."""
        if self.augment == "none":
            return batch
        elastic = self.augment == "elastic"
        return TaskBatch(
            *(distort(x, generator, elastic=elastic) if x.is_floating_point() else x for x in batch)
        )

    def gather(self, rows: torch.Tensor) -> TaskBatch:
        """The tasks whose images are at ``rows`` ``[T, N, K + Q]`` (row ``class * examples +
        example``; the first ``K`` of each class form the support set): how samplers with their
        own rules of choice, such as :class:`~metafunc.data.lake.WithinAlphabetRuns`, build
        batches."""
        tasks, ways, k, q = rows.shape[0], self.ways, self.shots, self.queries
        rows = rows.to(self.device, non_blocking=True)
        # One gather and one conversion for support and query: both are contiguous views.
        order = torch.cat([rows[:, :, :k].reshape(-1), rows[:, :, k:].reshape(-1)])
        x = self._data.index_select(0, order)
        if not self._normalised:
            x = self._normalise(x)
        split = tasks * ways * k
        support_x = x[:split].view(tasks, ways * k, *self._image_shape)
        query_x = x[split:].view(tasks, ways * q, *self._image_shape)
        labels = torch.arange(ways, device=self.device)
        support_y = labels.repeat_interleave(k).expand(tasks, -1).contiguous()
        query_y = labels.repeat_interleave(q).expand(tasks, -1).contiguous()
        return TaskBatch(support_x, support_y, query_x, query_y)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).mul_(self._scale)
        return x if self._shift is None else x.sub_(self._shift)


def distort(x: torch.Tensor, generator: torch.Generator, *, elastic: bool = False) -> torch.Tensor:
    """Every image of ``x [..., C, H, W]`` under its own random affine map (``augment='affine'``
    of :class:`EpisodeSampler`), bilinear, zero outside (black, Omniglot's background);
    ``elastic=True`` (``augment='elastic'``) moves every pixel of the map further by
    :func:`elastic_field`, bending strokes as a hand would rather than only the whole drawing."""
    shape = x.shape
    flat = x.reshape(-1, *shape[-3:])
    n, device = flat.shape[0], generator.device

    def uniform(low: float, high: float, *size: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *size, generator=generator, device=device)

    angle = uniform(-math.pi / 18, math.pi / 18)
    shear = uniform(-0.3, 0.3, 2)
    scale = uniform(0.8, 1.2, 2)
    shift = uniform(-2 / 14, 2 / 14, 2)  # ±2 pixels of 28: grid units span 2 per side
    cos, sin = angle.cos(), angle.sin()
    rotate = torch.stack([cos, -sin, sin, cos], -1).view(n, 2, 2)
    skew = torch.eye(2, device=device).repeat(n, 1, 1)
    skew[:, 0, 1], skew[:, 1, 0] = shear[:, 0], shear[:, 1]
    theta = torch.cat([rotate @ skew / scale.unsqueeze(1), shift.unsqueeze(-1)], -1)
    grid = torch.nn.functional.affine_grid(theta.to(x), list(flat.shape), align_corners=False)
    if elastic:
        grid = grid + elastic_field(n, shape[-2], shape[-1], generator).to(grid)
    out = torch.nn.functional.grid_sample(flat, grid.to(x.device), align_corners=False)
    return out.reshape(shape)


def elastic_field(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random displacement fields ``[n, H, W, 2]`` in ``grid_sample``'s units (2 per side):
    Simard et al. (2003)'s elastic deformation, uniform noise in ``[-1, 1]`` per pixel and axis
    smoothed by a Gaussian of σ = 4 px and scaled by α = 34 px, their values for 28 px digits.
    The field is drawn at 28 px on the short side and resized, so a drawing bends alike at every
    image size. Not torchvision's ``ElasticTransform``: it draws one field per call, from the
    global random state; here every image has its own, from ``generator``."""
    device = generator.device
    h, w = 28, max(1, round(28 * width / height))
    sigma = 4.0
    radius = int(3 * sigma)  # the kernel's half-width, three standard deviations
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    noise = 2 * torch.rand(n * 2, 1, h, w, generator=generator, device=device) - 1
    noise = torch.nn.functional.conv2d(noise, kernel.view(1, 1, 1, -1), padding=(0, radius))
    noise = torch.nn.functional.conv2d(noise, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    field = noise.view(n, 2, h, w) * (34.0 * 2 / 28)
    if (h, w) != (height, width):
        field = torch.nn.functional.interpolate(field, size=(height, width), mode="bilinear")
    return field.permute(0, 2, 3, 1)


def _distinct(
    tasks: int, total: int, ways: int, accept: float, generator: torch.Generator
) -> torch.Tensor:
    """``[tasks, ways]`` ints in ``[0, total)``, distinct within a row, uniformly random in order.

    When a row of ``ways`` independent draws is likely distinct (probability ``accept`` >= 1/2),
    rows with a repeat are redrawn (rejection sampling keeps the uniform distribution over ordered
    distinct tuples); otherwise the ``ways`` largest of ``total`` uniform keys are taken.
    """
    device = generator.device
    if accept < 0.5:
        keys = torch.rand(tasks, total, generator=generator, device=device)
        return keys.topk(ways, dim=1).indices
    ids = torch.randint(total, (tasks, ways), generator=generator, device=device)
    while ways > 1:
        ordered = ids.sort(dim=1).values
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        redo = int(repeat.sum())
        if redo == 0:
            break
        ids[repeat] = torch.randint(total, (redo, ways), generator=generator, device=device)
    return ids


def check_rotations(
    rotations: Sequence[int], height: int, width: int, *, call: str
) -> tuple[int, ...]:
    angles = tuple(int(a) % 360 for a in rotations)
    if not angles or any(a % 90 for a in angles) or len(set(angles)) != len(angles):
        raise ValueError(
            f"{call}: rotations={tuple(rotations)!r}; pass distinct multiples of 90 degrees, e.g. "
            "(0,) for none or (0, 90, 180, 270) for Omniglot's four rotated classes."
        )
    if height != width and any(a % 180 for a in angles):
        raise ValueError(
            f"{call}: rotating {height}x{width} images by 90 degrees changes their shape; use "
            "rotations=(0, 180) or square images."
        )
    return angles


def _normalisation(
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    call: str,
) -> tuple[torch.Tensor | float, torch.Tensor | None]:
    """``scale``, ``shift`` such that ``(x / 255 - mean) / std == x * scale - shift``."""
    if mean is None and std is None:
        return 1.0 / 255.0, None
    values = []
    for arg, value, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        v = torch.as_tensor(default if value is None else value, dtype=torch.float64).reshape(-1)
        if v.numel() == 1:
            v = v.expand(channels)
        if v.numel() != channels:
            raise ValueError(
                f"{call}: {arg} has {v.numel()} values but the images have {channels} channel(s)."
            )
        values.append(v)
    m, s = values
    if bool((s <= 0).any()):
        raise ValueError(f"{call}: std={std!r} must be positive.")
    shape = (channels, 1, 1)
    scale = (1.0 / (255.0 * s)).to(device=device, dtype=dtype).view(shape)
    shift = (m / s).to(device=device, dtype=dtype).view(shape)
    return scale, shift
