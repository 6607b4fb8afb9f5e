"""Lake et al.'s one-shot classification protocol for Omniglot (Science 2015, "Human-level
concept learning through probabilistic program induction").

A run is a 20-way within-alphabet task: 20 characters of one evaluation alphabet, one training
drawing of each by one drawer, and one test drawing of each by a different drawer; the score is
the error over the 20 test drawings. Characters of one alphabet look alike and one drawer's hand
is consistent, so these runs are harder than Vinyals et al.'s episodes of random characters from
any alphabet, and they are the protocol humans (4.5% error) and Bayesian Program Learning (3.3%)
were measured on. Lake et al. published 20 runs; :class:`WithinAlphabetRuns` draws any number of
them, seeded, so evaluations of two models are comparable.

Drawers come from Omniglot's file names (``XXXX_YY.png``: drawer ``YY``), which
:func:`~metafunc.data.load_omniglot` keeps in :attr:`ClassImages.drawers`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from metafunc.data.batch import TaskBatch
from metafunc.data.dataset import ClassImages, concat_classes
from metafunc.data.sampler import (
    EpisodeSampler,
    check_episodes_args,
    check_generator,
    check_num_tasks,
    check_rotations,
)

__all__ = ["WithinAlphabetRuns", "alphabet_of", "mirrored_alphabets"]


def alphabet_of(name: str) -> str:
    """The alphabet of an Omniglot class name ``"<set>/<Alphabet>/characterNN"``."""
    return name.rsplit("/", 1)[0]


class WithinAlphabetRuns:
    """Lake et al.'s one-shot runs (module docs) as a task sampler.

    A task picks an alphabet uniformly, ``ways`` of its characters, and ``shots + queries``
    distinct drawers among those who drew all of that alphabet's characters: the support set is
    the first ``shots`` drawers' drawings of each character, the query set the other drawers'.
    Lake et al.'s protocol is ``ways=20, shots=1, queries=1``. Alphabets with fewer than ``ways``
    characters (or fewer than ``shots + queries`` common drawers) are skipped with a warning that
    counts them; :attr:`skipped` names them.

    As a training sampler it gives episodes shaped like the test's (one alphabet's look-alike
    characters, two hands), with ``rotations`` (each rotated alphabet a new alphabet, as
    Omniglot's rotated classes are new classes) and ``augment``; :meth:`episodes` never
    distorts.

    Args:
        data: images with drawer identities (:attr:`ClassImages.drawers`), class names
            ``"<set>/<Alphabet>/characterNN"`` (as :func:`~metafunc.data.load_omniglot` makes).
        ways, shots, queries: characters per run, and support / query drawers per character.
        rotations: angles (multiples of 90) whose rotated alphabets join the runs' alphabets.
        augment: ``"affine"`` or ``"elastic"``: :meth:`sample` distorts every image
            (:func:`~metafunc.data.sampler.distort`); ``"none"`` (default).
        mean, std, device, dtype: as :class:`~metafunc.data.EpisodeSampler`.

    Batches are :class:`TaskBatch` es laid out as :class:`~metafunc.data.EpisodeSampler`'s, so
    every algorithm's ``evaluate`` scores them; accuracy is one minus Lake et al.'s error.
    """

    def __init__(
        self,
        data: ClassImages,
        *,
        ways: int = 20,
        shots: int = 1,
        queries: int = 1,
        rotations: Sequence[int] = (0,),
        augment: str = "none",
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        call = "WithinAlphabetRuns(...)"
        if not isinstance(data, ClassImages) or data.drawers is None:
            raise ValueError(
                f"{call}: the within-alphabet protocol needs who drew each image, and these "
                "images carry no drawer identities (ClassImages.drawers is None). Omniglot's file "
                "names XXXX_YY.png carry them: load the official folders or zips with "
                "metafunc.data.load_omniglot (files renamed otherwise lose them)."
            )
        data = _rotated_alphabets(data, rotations, call=call)
        self._episodes = EpisodeSampler(
            data, ways=ways, shots=shots, queries=queries, mean=mean, std=std, device=device,
            dtype=dtype, augment=augment,
        )  # fmt: skip
        assert data.drawers is not None
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device, self.dtype = self._episodes.device, dtype
        examples = int(data.images.shape[1])
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(data.classes):
            groups.setdefault(alphabet_of(name), []).append(index)
        self._alphabets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.skipped: dict[str, str] = {}
        for alphabet, members in groups.items():
            drawers = data.drawers[members]  # [characters, examples]
            common = set(drawers[0].tolist()) - {-1}
            for row in drawers[1:]:
                common &= set(row.tolist())
            if len(members) < ways:
                self.skipped[alphabet] = f"{len(members)} characters < ways={ways}"
                continue
            if len(common) < shots + queries:
                self.skipped[alphabet] = f"{len(common)} drawers drew every character"
                continue
            who = torch.tensor(sorted(common), dtype=torch.int64)
            # row of drawer who[d]'s drawing of character c, in the sampler's flat image rows
            match = drawers.unsqueeze(1) == who.view(1, -1, 1)  # [characters, drawers, examples]
            rows = torch.tensor(members).view(-1, 1) * examples + match.int().argmax(-1)
            self._alphabets.append((torch.tensor(members), who, rows))
        if not self._alphabets:
            raise ValueError(
                f"{call}: no alphabet has {ways} characters drawn by {shots + queries} common "
                f"drawers ({len(groups)} alphabets: {self.skipped}); lower ways."
            )
        if self.skipped:
            warnings.warn(
                f"{call}: skipped {len(self.skipped)} of {len(groups)} alphabets: "
                + "; ".join(f"{a} ({why})" for a, why in self.skipped.items()),
                stacklevel=2,
            )

    @property
    def alphabets(self) -> int:
        """The number of alphabets runs are drawn from."""
        return len(self._alphabets)

    def _rows(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Image rows ``[count, ways, shots + queries]``, drawn with ``generator`` on the CPU."""
        out = torch.empty(count, self.ways, self.shots + self.queries, dtype=torch.int64)
        picks = torch.randint(len(self._alphabets), (count,), generator=generator)
        for t, a in enumerate(picks.tolist()):
            members, who, rows = self._alphabets[a]
            chars = torch.randperm(len(members), generator=generator)[: self.ways]
            drawers = torch.randperm(len(who), generator=generator)[: self.shots + self.queries]
            out[t] = rows[chars][:, drawers]
        return out

    def sample(self, num_tasks: int, generator: torch.Generator) -> TaskBatch:
        """``num_tasks`` runs drawn with ``generator`` (a CPU generator)."""
        call = "WithinAlphabetRuns.sample"
        check_num_tasks(num_tasks, call=call)
        check_generator(generator, call=call)
        return self._episodes.augmented(self._episodes.gather(self._rows(num_tasks, generator)),
                                        generator)  # fmt: skip

    def episodes(self, count: int, seed: int, batch_size: int = 32) -> Iterator[TaskBatch]:
        """A fixed set of ``count`` runs drawn from ``seed``, ``batch_size`` at a time; the runs
        depend on ``seed`` alone, not on ``batch_size`` or the device."""
        check_episodes_args(count, batch_size, call="WithinAlphabetRuns.episodes")
        rows = self._rows(count, torch.Generator().manual_seed(seed))
        return (
            self._episodes.gather(rows[i : i + batch_size]) for i in range(0, count, batch_size)
        )


def mirrored_alphabets(data: ClassImages) -> ClassImages:
    """``data`` followed by its characters mirrored left to right, as new alphabets
    ``<Alphabet>@mirror``: a mirrored character is another character, as a rotated one is, so
    training sees twice the classes (and, with rotations, all eight symmetries of the square).
    Drawers and counts are kept, so the mirrored alphabets form within-alphabet runs too."""
    call = "mirrored_alphabets(data)"
    if not isinstance(data, ClassImages):
        raise TypeError(
            f"{call}: data must be a ClassImages, got {type(data).__name__}; load Omniglot with "
            "metafunc.data.load_omniglot."
        )
    names = _alphabet_names(data, "mirror", call=call)
    mirrored = ClassImages(data.images.flip(-1), names, data.counts, data.drawers)
    return concat_classes([data, mirrored], call=call)


def _rotated_alphabets(data: ClassImages, rotations: Sequence[int], *, call: str) -> ClassImages:
    """``data`` and its copies rotated by each other angle, as alphabets ``<Alphabet>@rot<a>``."""
    angles = check_rotations(rotations, *data.images.shape[-2:], call=call)
    parts = []
    for angle in angles:
        if angle == 0:
            parts.append(data)
            continue
        names = _alphabet_names(data, f"rot{angle}", call=call)
        images = torch.rot90(data.images, k=angle // 90, dims=(-2, -1))
        parts.append(ClassImages(images, names, data.counts, data.drawers))
    return parts[0] if len(parts) == 1 else concat_classes(parts, call=call)


def _alphabet_names(data: ClassImages, tag: str, *, call: str) -> tuple[str, ...]:
    """``data``'s class names moved to new alphabets ``<Alphabet>@<tag>``, for transformed
    copies of its characters."""
    odd = [n for n in data.classes if "/" not in n]
    if odd:
        raise ValueError(
            f"{call}: class names must read '<Alphabet>/<character>' (load_omniglot's are "
            f"'<set>/<Alphabet>/characterNN'), got {odd[0]!r}; name each class by its alphabet "
            "and character."
        )
    return tuple(f"{alphabet_of(n)}@{tag}/{n.rsplit('/', 1)[1]}" for n in data.classes)
