"""Class-indexed image sets: one uint8 tensor ``[classes, examples, ...]`` plus the class names.

Every image loader in :mod:`metafunc.data` returns a :class:`ClassImages`, and every episode sampler
takes one. Classes with fewer examples than the largest one are padded with zero images; ``counts``
then says how many leading examples of each class are real, and samplers never draw the padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ClassImages", "ClassSplits", "concat_classes", "stack_classes"]


class ClassImages(NamedTuple):
    """Images grouped by class.

    Attributes:
        images: uint8 ``[classes, examples, H, W]`` (grey) or ``[classes, examples, C, H, W]``.
        classes: one name per class, in the order of ``images``' first axis.
        counts: int64 ``[classes]``, the number of real examples of each class (the rest is zero
            padding), or ``None`` when every class fills all ``examples`` slots.
        drawers: int64 ``[classes, examples]``, who made each example (Omniglot's drawer, from
            its file names; -1 for padding), or ``None`` where the source does not say. Lake et
            al.'s one-shot protocol (:mod:`metafunc.data.lake`) needs it.
    """

    images: torch.Tensor
    classes: tuple[str, ...]
    counts: torch.Tensor | None = None
    drawers: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    def example_counts(self) -> torch.Tensor:
        """int64 ``[classes]``: the number of real examples of each class."""
        if self.counts is not None:
            return self.counts
        return torch.full((self.num_classes,), int(self.images.shape[1]), dtype=torch.int64)

    def select(self, indices: Sequence[int] | torch.Tensor) -> ClassImages:
        """The classes at ``indices`` (in that order), as a new :class:`ClassImages`."""
        index = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        counts = None if self.counts is None else self.counts[index]
        drawers = None if self.drawers is None else self.drawers[index]
        names = tuple(self.classes[i] for i in index.tolist())
        return ClassImages(self.images[index], names, counts, drawers)

    def select_names(self, names: Sequence[str], *, call: str) -> ClassImages:
        """The classes called ``names`` (in that order); unknown names raise ``ValueError``."""
        position = {name: i for i, name in enumerate(self.classes)}
        missing = [name for name in names if name not in position]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            known = ", ".join(repr(n) for n in self.classes[:10])
            raise ValueError(
                f"{call}: {len(missing)} class name(s) are not in the data, e.g. {shown}. "
                f"Use names from the data ({len(self.classes)} classes, e.g. {known})."
            )
        return self.select([position[name] for name in names])


class ClassSplits(NamedTuple):
    """Disjoint class sets for meta-training, validation (may be ``None``) and meta-testing."""

    train: ClassImages
    validation: ClassImages | None
    test: ClassImages


def stack_classes(arrays: Sequence[np.ndarray], names: Sequence[str], *, call: str) -> ClassImages:
    """Stack per-class uint8 arrays ``[n_i, H, W(, C)]`` into one :class:`ClassImages`.

    Channels-last colour arrays become channels-first ``[classes, examples, C, H, W]``. Classes
    with fewer than the largest ``n_i`` examples are zero-padded and recorded in ``counts``.
    """
    import numpy as np

    if len(arrays) != len(names):
        raise ValueError(f"{call}: got {len(arrays)} image arrays for {len(names)} class names.")
    if not arrays:
        raise ValueError(f"{call}: there are no classes to stack; check the data folder.")
    shapes = {tuple(a.shape[1:]) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"{call}: the images have different shapes {sorted(shapes)}; resize them to one size."
        )
    lengths = [int(a.shape[0]) for a in arrays]
    empty = [name for name, n in zip(names, lengths, strict=True) if n == 0]
    if empty:
        raise ValueError(f"{call}: class {empty[0]!r} has no images; remove it or add images.")
    most = max(lengths)
    out = np.zeros((len(arrays), most, *shapes.pop()), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    images = torch.from_numpy(out)
    if images.ndim == 5:
        images = images.permute(0, 1, 4, 2, 3).contiguous()
    counts = None
    if min(lengths) != most:
        counts = torch.tensor(lengths, dtype=torch.int64)
    return ClassImages(images, tuple(names), counts)


def concat_classes(parts: Sequence[ClassImages], *, call: str) -> ClassImages:
    """The classes of all ``parts`` in order, zero-padding the example axis to the longest part
    (drawers are kept when every part has them)."""
    if not parts:
        raise ValueError(f"{call}: there are no class sets to join.")
    shapes = {tuple(p.images.shape[2:]) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{call}: the class sets have different image shapes {sorted(shapes)}.")
    most = max(int(p.images.shape[1]) for p in parts)
    images, counts, drawers = [], [], []
    for p in parts:
        pad = most - int(p.images.shape[1])
        zeros = p.images.new_zeros((p.num_classes, pad, *p.images.shape[2:]))
        images.append(torch.cat([p.images, zeros], dim=1))
        counts.append(p.example_counts())
        if p.drawers is not None:
            drawers.append(torch.nn.functional.pad(p.drawers, (0, pad), value=-1))
    all_counts = torch.cat(counts)
    names = tuple(name for p in parts for name in p.classes)
    ragged = bool((all_counts != most).any())
    known = torch.cat(drawers) if len(drawers) == len(parts) else None
    return ClassImages(torch.cat(images), names, all_counts if ragged else None, known)


def check_disjoint(splits: Mapping[str, Sequence[str]], *, call: str) -> None:
    """Raise ``ValueError`` if a class name occurs in two splits (that would leak test classes)."""
    seen: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in seen and seen[name] != split:
                raise ValueError(
                    f"{call}: class {name!r} is in both the {seen[name]!r} and {split!r} splits; "
                    "meta-learning splits must have disjoint classes. Remove it from one split."
                )
            seen[name] = split
