"""Lake et al.'s one-shot protocol: drawers from file names, within-alphabet runs, alphabet-level
validation splits, affine distortions, validation during training and cross-domain evaluation."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from metafunc.cli import main
from metafunc.data import (
    ClassImages,
    EpisodeSampler,
    TaskBatch,
    WithinAlphabetRuns,
    get_benchmark,
    load_omniglot,
    mirrored_alphabets,
    omniglot_splits,
)
from metafunc.harness import Config, ConfigError
from metafunc.harness.run import load_run

BACKGROUND = {"Alpha": 4, "Beta": 3, "Gamma": 3, "Delta": 3}
EVALUATION = {"Eta": 5, "Theta": 4, "Iota": 2}
DRAWERS = 5


def write_omniglot(root: Path, stem: str, alphabets: dict[str, int], *, named: bool = True) -> None:
    """Omniglot's folder layout, ``DRAWERS`` drawings per character named ``XXXX_YY.png``. Each
    image is ``character * 8 + drawer`` on one pixel, so tests can read back who drew what."""
    number = 0
    for alphabet, characters in alphabets.items():
        for c in range(characters):
            number += 1
            folder = root / "omniglot-py" / stem / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(1, DRAWERS + 1):
                pixels = torch.full((28, 28), 255, dtype=torch.uint8)  # inverted on load
                pixels[0, 0] = 255 - (number * 8 + d)
                name = f"{number:04d}_{d:02d}.png" if named else f"drawing{d}.png"
                Image.fromarray(pixels.numpy()).save(folder / name)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    write_omniglot(tmp_path / "data", "images_background", BACKGROUND)
    write_omniglot(tmp_path / "data", "images_evaluation", EVALUATION)
    return tmp_path / "data"


def who(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(character number, drawer) of images written by :func:`write_omniglot`."""
    code = (x[..., 0, 0, 0] * 255).round().long()
    return code // 8, code % 8


def test_drawers_come_from_the_file_names(root: Path) -> None:
    data = load_omniglot(root, "evaluation", workers=1)
    assert data.drawers is not None and data.drawers.shape == (11, DRAWERS)
    assert data.drawers.tolist() == [list(range(1, DRAWERS + 1))] * 11
    again = load_omniglot(root, "evaluation", workers=1)  # the cache keeps them
    assert again.drawers is not None and torch.equal(again.drawers, data.drawers)
    assert data.select([2, 0]).drawers.tolist() == data.drawers[[2, 0]].tolist()


def test_runs_are_within_one_alphabet_with_two_drawers(root: Path) -> None:
    data = load_omniglot(root, "evaluation", workers=1)
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 alphabets: .*Iota \(2 characters"):
        runs = WithinAlphabetRuns(data, ways=3, shots=1, queries=2)
    assert runs.alphabets == 2 and list(runs.skipped) == ["images_evaluation/Iota"]
    first = {1: "Eta", 6: "Theta"}  # first character number of each alphabet run draws from
    batches = list(runs.episodes(40, seed=3, batch_size=16))
    assert [b.num_tasks for b in batches] == [16, 16, 8]
    for batch in batches:
        s_char, s_drawer = who(batch.support_x)
        q_char, q_drawer = who(batch.query_x)
        for t in range(batch.num_tasks):
            chars = s_char[t].tolist()
            assert len(set(chars)) == 3, "distinct characters"
            assert len({max(k for k in first if k <= c) for c in chars}) == 1, "one alphabet"
            assert len(set(s_drawer[t].tolist())) == 1, "one support drawer"
            assert set(q_drawer[t].tolist()).isdisjoint(s_drawer[t].tolist())
            assert q_char[t].tolist() == [c for c in chars for _ in range(2)]
        assert batch.support_y[0].tolist() == [0, 1, 2]
    again = torch.cat([b.support_x for b in runs.episodes(40, seed=3, batch_size=7)])
    assert torch.equal(again, torch.cat([b.support_x for b in batches])), "fixed by the seed"


def test_runs_refuse_images_without_drawers_and_too_many_ways(root: Path, tmp_path: Path) -> None:
    data = load_omniglot(root, "evaluation", workers=1)
    with pytest.raises(ValueError, match=r"needs who drew each image.*XXXX_YY\.png"):
        WithinAlphabetRuns(data._replace(drawers=None))
    with pytest.raises(ValueError, match=r"no alphabet has 6 characters.*lower ways"):
        WithinAlphabetRuns(data, ways=6)
    renamed = tmp_path / "renamed"
    write_omniglot(renamed, "images_background", BACKGROUND, named=False)
    write_omniglot(renamed, "images_evaluation", EVALUATION, named=False)
    plain = load_omniglot(renamed, "evaluation", workers=1, cache=False)
    assert plain.drawers is None
    with pytest.raises(ValueError, match="the test split: .*needs who drew each image"):
        get_benchmark("omniglot-lake", renamed, ways=2, queries=1, protocol="within-alphabet",
                      cache=False)  # fmt: skip


def test_validation_alphabets_hold_out_whole_alphabets(root: Path) -> None:
    splits = omniglot_splits(root, "lake", validation_alphabets=2, split_seed=1)
    assert splits.validation is not None

    def alphabets(data: ClassImages) -> set[str]:
        return {n.split("/")[1] for n in data.classes}

    assert len(alphabets(splits.validation)) == 2
    assert alphabets(splits.train) | alphabets(splits.validation) == set(BACKGROUND)
    assert not alphabets(splits.train) & alphabets(splits.validation)
    assert alphabets(splits.test) == set(EVALUATION)
    with pytest.raises(ValueError, match=r"validation_alphabets=4 must be in \[1, 3\]"):
        omniglot_splits(root, "lake", validation_alphabets=4)
    with pytest.raises(ValueError, match="for this split use num_validation"):
        omniglot_splits(root, "lake", validation_alphabets=1, num_validation=2)


def test_protocol_option_and_its_errors(root: Path) -> None:
    bench = get_benchmark("omniglot-lake", root, ways=2, shots=1, queries=1,
                          protocol="within-alphabet", validation_alphabets=1)  # fmt: skip
    assert isinstance(bench.test, WithinAlphabetRuns)
    assert isinstance(bench.validation, WithinAlphabetRuns)
    assert isinstance(bench.train, EpisodeSampler)
    with pytest.raises(ValueError, match=r"protocol='lake'; use one of \('random'"):
        get_benchmark("omniglot-lake", root, protocol="lake")


def test_within_alphabet_training_episodes_rotate_and_distort(root: Path) -> None:
    bench = get_benchmark("omniglot-lake", root, ways=3, shots=1, queries=1, augment="affine",
                          train_protocol="within-alphabet", rotations=(0, 180))  # fmt: skip
    train = bench.train
    assert isinstance(train, WithinAlphabetRuns) and isinstance(bench.test, EpisodeSampler)
    assert train.alphabets == 2 * 4, "each rotation of an alphabet is an alphabet of its own"
    a = train.sample(6, torch.Generator().manual_seed(0))
    b = train.sample(6, torch.Generator().manual_seed(0))
    assert torch.equal(a.support_x, b.support_x) and a.support_x.shape == (6, 3, 1, 28, 28)
    plain = get_benchmark("omniglot-lake", root, ways=3, shots=1, queries=1,
                          train_protocol="within-alphabet", rotations=(0, 180)).train  # fmt: skip
    c = plain.sample(6, torch.Generator().manual_seed(0))
    assert not torch.equal(a.support_x, c.support_x), "distorted"
    upright = [who(c.support_x[t : t + 1])[0] for t in range(6)]  # rotated: pixel moves away
    assert any(int(u.sum()) == 0 for u in upright) and any(int(u.sum()) > 0 for u in upright)
    with pytest.raises(ValueError, match="train_protocol='lake'"):
        get_benchmark("omniglot-lake", root, train_protocol="lake")


def test_mirrored_characters_are_new_training_characters(root: Path) -> None:
    data = load_omniglot(root, "background", workers=1)
    both = mirrored_alphabets(data)
    assert both.num_classes == 2 * data.num_classes == 26
    assert both.classes[13] == "images_background/Alpha@mirror/character01"
    assert torch.equal(both.images[13:], data.images.flip(-1))
    assert both.drawers is not None and data.drawers is not None
    assert torch.equal(both.drawers[13:], data.drawers)
    kw: dict[str, Any] = dict(ways=3, shots=1, queries=1, rotations=(0,))
    plain = get_benchmark("omniglot-lake", root, **kw)
    random = get_benchmark("omniglot-lake", root, mirror=True, **kw)
    assert random.train.num_classes == 2 * plain.train.num_classes
    runs = get_benchmark("omniglot-lake", root, mirror=True, train_protocol="within-alphabet",
                         **kw).train  # fmt: skip
    assert isinstance(runs, WithinAlphabetRuns) and runs.alphabets == 2 * 4
    batch = runs.sample(12, torch.Generator().manual_seed(0))
    corner = batch.support_x[:, :, 0, 0, -1]  # a mirrored drawing's pixel moves to the right
    mirrored = (corner > 0).all(1)
    assert mirrored.any() and not mirrored.all(), "tasks of mirrored and upright alphabets"
    assert (batch.support_x[mirrored][..., 0, 0, 0] == 0).all()
    for a, b in zip(random.test.episodes(4, 0), plain.test.episodes(4, 0), strict=True):
        assert torch.equal(a.support_x, b.support_x), "evaluation characters are not mirrored"


def test_mirrored_alphabets_refuse_classes_without_alphabets() -> None:
    flat = ClassImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ("a", "b"))
    with pytest.raises(ValueError, match=r"mirrored_alphabets\(data\): class names must read"):
        mirrored_alphabets(flat)
    with pytest.raises(TypeError, match="data must be a ClassImages, got Tensor"):
        mirrored_alphabets(torch.zeros(2, 3, 4, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize("augment", ["affine", "elastic"])
def test_distortion_is_seeded_and_spares_evaluation(root: Path, augment: str) -> None:
    plain = get_benchmark("omniglot-lake", root, ways=3, queries=1).train
    bent = get_benchmark("omniglot-lake", root, ways=3, queries=1, augment=augment).train
    a = bent.sample(4, torch.Generator().manual_seed(0))
    b = bent.sample(4, torch.Generator().manual_seed(0))
    c = plain.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(a.support_x, b.support_x) and a.support_x.shape == c.support_x.shape
    assert not torch.equal(a.support_x, c.support_x) and torch.equal(a.support_y, c.support_y)
    assert a.support_x.min() >= 0 and a.support_x.max() <= 1
    same = [torch.equal(x.support_x, y.support_x)
            for x, y in zip(bent.episodes(4, 0), plain.episodes(4, 0), strict=True)]  # fmt: skip
    assert all(same)
    with pytest.raises(ValueError, match=r"augment='cutout'; use one of \('none', 'affine', 'e"):
        EpisodeSampler(torch.zeros(3, 2, 4, 4, dtype=torch.uint8), ways=2, shots=1, queries=1,
                       augment="cutout")  # fmt: skip


def test_elastic_fields_bend_drawings_alike_at_every_size() -> None:
    """Simard et al.'s field: about a pixel of 28 on average, the same share of the image at 56
    px, smooth (neighbouring pixels move together), seeded; ``elastic=True`` adds it to the
    affine map drawn first, so the two distortions of one seed differ by the field alone."""
    from metafunc.data.sampler import distort, elastic_field

    small = elastic_field(400, 28, 28, torch.Generator().manual_seed(0))
    large = elastic_field(400, 56, 56, torch.Generator().manual_seed(0))
    assert small.shape == (400, 28, 28, 2) and large.shape == (400, 56, 56, 2)
    assert 0.5 < float(small.abs().mean()) * 14 < 2.0  # grid units (2 per side) to pixels of 28
    assert abs(float(large.abs().mean()) / float(small.abs().mean()) - 1) < 0.1
    step = (small[:, 1:] - small[:, :-1]).abs().mean()
    assert float(step) < 0.2 * float(small.abs().mean())  # smooth, unlike per-pixel noise
    assert torch.equal(small, elastic_field(400, 28, 28, torch.Generator().manual_seed(0)))
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 8:20, 13:15] = 1.0  # a vertical stroke
    affine = distort(x, torch.Generator().manual_seed(1))
    bent = distort(x, torch.Generator().manual_seed(1), elastic=True)
    assert not torch.allclose(affine, bent)
    assert abs(float(bent.sum() - affine.sum())) < 0.5 * float(affine.sum())  # bent, not lost


TRAIN = ["train", "--algorithm", "protonet", "--dataset", "omniglot-lake", "--ways", "2",
         "--shots", "1", "--eval-shots", "1", "--queries", "1", "--eval-queries", "1",
         "--train-ways", "3",
         "--meta-batch", "1", "--eval-inner-steps", "0", "--report-steps", "0", "--hidden", "4",
         "--protocol", "within-alphabet", "--validation-alphabets", "1", "--eval-every", "2",
         "--val-episodes", "5", "--eval-episodes", "6", "--strategy", "loop", "--compile", "off",
         "--augment", "affine", "--quiet", "--log-every", "1"]  # fmt: skip


def test_validation_during_training_keeps_the_best(root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = [*TRAIN, "--data-root", str(root), "--run-dir", str(run), "--keep-best"]
    assert main([*argv, "--iterations", "4"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in scored] == [2, 4] and all("val_loss" in r for r in scored)
    best = max(scored, key=lambda r: r["val_accuracy"])  # the first of equal scores is kept
    first_best = next(r["step"] for r in scored if r["val_accuracy"] == best["val_accuracy"])
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == f"best.safetensors (step {first_best})"
    assert result["protocol"] == "within-alphabet" and result["episodes"] == 6
    assert main(["eval", str(run), "--episodes", "4"]) == 0
    assert "test (4 runs within one alphabet, checkpoint best" in capsys.readouterr().out
    assert main(["eval", str(run), "--protocol", "random", "--episodes", "4"]) == 0
    other = json.loads((run / "eval-random.json").read_text())
    assert other["protocol"] == "random" and other["checkpoint"] == result["checkpoint"]
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0


def write_cifar100(root: Path) -> None:
    """CIFAR-100's python files as torchvision unpacks them, two images per class."""
    from metafunc.data import CIFAR_FS_CLASSES

    names = sorted(n for split in CIFAR_FS_CLASSES.values() for n in split)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for part in ("train", "test"):
        labels = [c for c in range(100) for _ in range(2)]
        data = torch.zeros(len(labels), 3072, dtype=torch.uint8).numpy()
        with open(folder / part, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)


def test_cross_domain_eval(root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*TRAIN, "--data-root", str(root), "--run-dir", str(run), "--iterations", "2"]) == 0
    write_omniglot(root, "images_background_small1", {"Alpha": 4, "Zeta": 3})
    assert main(["eval", str(run), "--dataset", "omniglot-small1", "--episodes", "4"]) == 0
    result = json.loads((run / "eval-omniglot-small1.json").read_text())
    assert result["protocol"] == "random" and result["episodes"] == 4
    with pytest.raises(SystemExit):  # an unknown dataset name is refused by the parser
        main(["eval", str(run), "--dataset", "no-such-set"])
    write_cifar100(tmp_path / "cifar")
    with pytest.raises(ConfigError, match=r"trained on omniglot-lake does not take cifar-fs's"):
        load_run(run, dataset="cifar-fs", data_root=str(tmp_path / "cifar"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keep_best": True}, r"keep_best \(--keep-best\) .* add --eval-every N"),
        ({"protocol": "within-alphabet", "dataset": "cifar-fs"}, "has none. Drop it"),
        ({"validation_alphabets": 2, "dataset": "omniglot"}, "not omniglot"),
        ({"augment": "affine", "dataset": "mini-imagenet"}, "mini-imagenet is not supported"),
        ({"mirror": True, "dataset": "cub"}, r"mirror \(--mirror\) .* cub's mirrored"),
        ({"halve_every": 10}, r"applies to protonet, r2d2, metaoptnet, not maml"),
        ({"image_size": 56, "dataset": "cifar-fs"}, "cifar-fs's are fixed. Drop it"),
        ({"train_protocol": "within-alphabet", "dataset": "cifar-fs"}, r"\(--train-protocol\)"),
    ],
)
def test_config_refuses_misplaced_keys(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**changes)


def test_eval_every_needs_a_validation_split(root: Path, tmp_path: Path) -> None:
    argv = [a for a in TRAIN if a not in ("--validation-alphabets", "1")]
    with pytest.raises(SystemExit):
        main([*argv, "--data-root", str(root), "--run-dir", str(tmp_path / "r"),
              "--iterations", "2"])  # fmt: skip


def test_full_omniglot_has_twenty_drawers_per_character(data_root: Path, tmp_path: Path) -> None:
    runs = get_benchmark("omniglot-lake", data_root, ways=20, shots=1, queries=1,
                         protocol="within-alphabet", cache_dir=tmp_path).test  # fmt: skip
    assert runs.alphabets == 20 and not runs.skipped  # every evaluation alphabet has >= 20
    batch = next(runs.episodes(2, seed=0))
    assert batch.support_x.shape == (2, 20, 1, 28, 28) and batch.query_x.shape == (2, 20, 1, 28, 28)


def ensemble_script() -> Any:
    """``benchmarks/ensemble.py`` as a module (``benchmarks/`` is not an installed package)."""
    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from benchmarks import ensemble

    return ensemble


def test_an_ensemble_scores_the_mean_of_its_runs_log_probabilities(root: Path, tmp_path) -> None:
    """``benchmarks/ensemble.py``: each run alone scores what its own evaluation did, the
    ensemble scores the same episodes, and runs of another benchmark are refused."""
    ensemble = ensemble_script()
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        argv = [*TRAIN, "--data-root", str(root), "--run-dir", str(run), "--keep-best"]
        assert main([*argv, "--iterations", "2", "--seed", str(seed)]) == 0
    result = ensemble.main([*map(str, runs), "--split", "test", "--out", str(tmp_path / "e.json")])
    for run in runs:
        own = json.loads((run / "eval.json").read_text())["accuracy"]["0"]["mean"]
        assert abs(result["error"][str(run)]["mean"] - (1.0 - own)) < 1e-6
    assert 0.0 <= result["error"]["ensemble"]["mean"] <= 1.0 and result["episodes"] == 6
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(result))
    assert ensemble.main([*map(str, runs), "--split", "validation"])["episodes"] == 5
    other = tmp_path / "other"
    argv = [*TRAIN, "--data-root", str(root), "--run-dir", str(other), "--ways", "3"]
    with pytest.warns(UserWarning, match="Iota \\(2 characters < ways=3\\)"):
        assert main([*argv, "--iterations", "1"]) == 0
    with pytest.warns(UserWarning, match="Iota"), pytest.raises(SystemExit, match="differ"):
        ensemble.main([str(runs[0]), str(other), "--split", "test"])


def test_an_ensemble_tells_episodes_apart_by_their_images_not_their_labels() -> None:
    """``benchmarks/ensemble.py``'s episode check: the same episodes at another image size and
    normalisation agree, other episodes of the same shape (same labels) do not."""
    same_episodes = ensemble_script().same_episodes
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(6, 20, 1, 28, 28, generator=gen) > 0.8).double()
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.flatten(0, 1), 7).reshape(6, -1)
    big = torch.nn.functional.interpolate(images.flatten(0, 1), size=56, mode="bilinear")
    resized = torch.nn.functional.adaptive_avg_pool2d(big, 7).reshape(6, -1)
    assert same_episodes(pooled, 3.0 * resized - 1.0)
    assert not same_episodes(pooled, pooled.roll(1, dims=0))
    assert not same_episodes(pooled, pooled[:5])


def test_test_time_views_add_distorted_copies_after_the_originals(root: Path, tmp_path) -> None:
    """``benchmarks/ensemble.py``'s test-time augmentation: the support set gains distorted
    copies with their labels, the query set view after view, the originals first; zero views
    change nothing, and a run scored with views still scores every query once."""
    ensemble = ensemble_script()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 3, 1, 28, 28, generator=gen) > 0.8).double()
    y = torch.arange(3).expand(2, 3)
    batch = TaskBatch(x, y, x.flip(-1), y)
    same = ensemble.with_views(batch, 0, 0, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(same, batch, strict=True))
    viewed = ensemble.with_views(batch, 2, 1, torch.Generator().manual_seed(1))
    assert viewed.support_x.shape == (2, 9, 1, 28, 28) and viewed.query_x.shape == (2, 6, 1, 28, 28)
    assert torch.equal(viewed.support_x[:, :3], x)
    assert torch.equal(viewed.query_x[:, :3], x.flip(-1))
    assert torch.equal(viewed.support_y, torch.arange(3).repeat(3).expand(2, 9))
    assert not torch.allclose(viewed.support_x[:, 3:6], x)  # distorted, each copy its own map
    assert not torch.allclose(viewed.support_x[:, 3:6], viewed.support_x[:, 6:])
    again = ensemble.with_views(batch, 2, 1, torch.Generator().manual_seed(1))
    assert torch.equal(again.support_x, viewed.support_x)  # seeded: every run sees the same
    bent = ensemble.with_views(batch, 2, 1, torch.Generator().manual_seed(1), elastic=True)
    assert torch.equal(bent.support_x[:, :3], x)
    assert not torch.allclose(bent.support_x[:, 3:], viewed.support_x[:, 3:])  # bent further

    run = tmp_path / "a"
    argv = [*TRAIN, "--data-root", str(root), "--run-dir", str(run)]
    assert main([*argv, "--iterations", "2"]) == 0
    result = ensemble.main([str(run), "--split", "test", "--support-views", "2",
                            "--query-views", "2", "--view-augment", "elastic"])  # fmt: skip
    assert (result["support_views"], result["query_views"]) == (2, 2)
    assert result["view_augment"] == "elastic"
    logp, labels, _ = ensemble.log_probs(run, "test", 6, 2, 2)
    assert logp.shape[:2] == labels.shape == (6, 2) and bool((logp <= 0).all())


def test_an_ensemble_search_scores_every_subset_best_first(root: Path, tmp_path) -> None:
    """``benchmarks/ensemble.py --search``: every subset of three runs is scored, each as the
    ensemble of that subset alone would be, and the rows come best first."""
    ensemble = ensemble_script()
    runs = [tmp_path / name for name in "abc"]
    for seed, run in enumerate(runs):
        argv = [*TRAIN, "--data-root", str(root), "--run-dir", str(run)]
        assert main([*argv, "--iterations", "2", "--seed", str(seed)]) == 0
    errors = ensemble.main([*map(str, runs), "--split", "test", "--search"])["error"]
    assert len(errors) == 7  # three runs alone, three pairs, all three
    means = [row["mean"] for row in errors.values()]
    assert means == sorted(means)
    pair = ensemble.main([str(runs[0]), str(runs[2]), "--split", "test"])["error"]["ensemble"]
    assert errors[f"{runs[0]} + {runs[2]}"] == pair


def test_an_ensemble_refuses_negative_views(capsys) -> None:
    ensemble = ensemble_script()
    with pytest.raises(SystemExit):
        ensemble.main(["runs/none", "--query-views", "-1"])
    assert "--query-views -1: counts are >= 0" in capsys.readouterr().err
