"""Score an ensemble of trained runs: the mean of their log-probabilities on the same fixed
episodes (the first run's benchmark), against each run alone.

An ensemble is one of the choices Lake et al.'s protocol allows when it is chosen on the
held-out background alphabets: ``--split validation`` scores the validation runs every run in
the ensemble held out, ``--split test`` the 600 test runs. Each run contributes its
best-on-validation checkpoint (its final one without ``--keep-best``). ``--support-views`` and
``--query-views`` add test-time augmentation, another such choice (:func:`with_views`);
``--search`` scores every subset of the runs as well, best first, to choose one on validation.
Prints a table and writes JSON; figures and their machine in ``benchmarks/HISTORY.md``.

Usage:
    python benchmarks/ensemble.py runs/reproduce/protonet-omniglot-lake runs/lake/h64 \\
        --split validation
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from metafunc.data import TaskBatch
from metafunc.data.sampler import AUGMENTATIONS, distort
from metafunc.harness.run import TEST_SEED, VALIDATION_SEED, load_run

VIEW_SEED = 7  # the distortions of the test-time views (the same for every run)


def with_views(
    batch: TaskBatch,
    support_views: int,
    query_views: int,
    generator: torch.Generator,
    *,
    elastic: bool = False,
) -> TaskBatch:
    """``batch`` with ``support_views`` distorted copies of every support image added to the
    support set (labels repeated, so a prototype or an inner step sees them all) and
    ``query_views`` distorted copies of every query image appended to the query set, view after
    view; the distortions are :func:`~metafunc.data.sampler.distort`'s, affine maps or, with
    ``elastic``, affine maps bent further (``--view-augment``), whatever the run trained with."""

    def copies(x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([x] + [distort(x, generator, elastic=elastic) for _ in range(n)], 1)

    support_y = batch.support_y.repeat(1, support_views + 1)
    query_y = batch.query_y.repeat(1, query_views + 1)
    return TaskBatch(copies(batch.support_x, support_views), support_y,
                     copies(batch.query_x, query_views), query_y)  # fmt: skip


def log_probs(
    run_dir: Path,
    split: str,
    episodes: int,
    support_views: int = 0,
    query_views: int = 0,
    elastic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log-probabilities [episodes, queries, ways], labels [episodes, queries], fingerprint)``
    of a run's checkpoint on the split's fixed episodes. The fingerprint, each episode's support
    images pooled to 7x7 ``[episodes, -1]``, identifies the episodes whatever the run's image
    size: labels alone cannot (every episode's are ``0..ways-1``).

    Test-time augmentation (:func:`with_views`, seeded the same for every run): the support set
    gains ``support_views`` distorted copies of each image, and each query's log-probabilities
    are averaged over the query as given and its ``query_views`` distorted copies."""
    run, meta, _ = load_run(run_dir)
    tasks = run.test_tasks if split == "test" else run.validation_tasks
    seed = TEST_SEED if split == "test" else VALIDATION_SEED
    alg = run.eval_algorithm.for_inference()
    out, labels, prints = [], [], []
    generator = torch.Generator().manual_seed(VIEW_SEED)
    with torch.no_grad():
        for batch in tasks.episodes(episodes, seed, batch_size=run.config.eval_batch):
            viewed = with_views(batch, support_views, query_views, generator, elastic=elastic)
            logits = alg.adapt_and_predict(meta, viewed, 0)[:, 0]  # [tasks, views * queries, ways]
            logp = torch.log_softmax(logits.double(), -1)
            out.append(logp.unflatten(1, (query_views + 1, -1)).mean(1))
            labels.append(batch.query_y)
            pooled = F.adaptive_avg_pool2d(batch.support_x.flatten(0, 1).double(), 7)
            prints.append(pooled.reshape(len(batch.support_x), -1))
    return torch.cat(out), torch.cat(labels), torch.cat(prints)


def same_episodes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two fingerprints are of the same episodes: equal shapes, and every episode's
    pooled images correlated above 0.9 (resizing and normalisation change them only a little;
    other characters do not correlate so)."""
    if a.shape != b.shape:
        return False
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
    return bool((corr > 0.9).all())


def error(logp: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean error over episodes and its 95% interval."""
    per_episode = 1.0 - (logp.argmax(-1) == labels).double().mean(-1)
    return float(per_episode.mean()), float(1.96 * per_episode.std() / math.sqrt(len(labels)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of the same benchmark")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--episodes", type=int, default=0, help="default: the first run's")
    parser.add_argument(
        "--support-views",
        type=int,
        default=0,
        help="distorted copies of each support image added (default 0)",
    )
    parser.add_argument(
        "--query-views",
        type=int,
        default=0,
        help="distorted copies each query's prediction is averaged over",
    )
    parser.add_argument(
        "--view-augment",
        choices=[name for name in AUGMENTATIONS if name != "none"],
        default="affine",
        help="the views' distortions, as training's --augment (default affine)",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="score every subset of the runs too, best first (on validation)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    views = (args.support_views, args.query_views)
    if min(views) < 0:
        parser.error(f"--support-views {views[0]} --query-views {views[1]}: counts are >= 0")
    first = json.loads((args.runs[0] / "config.json").read_text())
    episodes = args.episodes or (first["eval_episodes"] if args.split == "test" else
                                 first["val_episodes"])  # fmt: skip
    elastic = args.view_augment == "elastic"
    scored = [log_probs(run, args.split, episodes, *views, elastic) for run in args.runs]
    _, labels, prints = scored[0]
    for run, (_, other, other_prints) in zip(args.runs, scored, strict=True):
        if not torch.equal(labels, other) or not same_episodes(prints, other_prints):
            raise SystemExit(
                f"ensemble: the episodes of {run} differ from those of {args.runs[0]}; pass runs "
                "of one benchmark, protocol, ways and shots (image sizes may differ)"
            )
    rows = {
        str(run): error(logp, labels) for run, (logp, *_) in zip(args.runs, scored, strict=True)
    }
    rows["ensemble"] = error(torch.stack([logp for logp, *_ in scored]).mean(0), labels)
    if args.search:  # the subsets of two runs or more, short of all of them ("ensemble")
        for n in range(2, len(scored)):
            for subset in itertools.combinations(range(len(scored)), n):
                logp = torch.stack([scored[i][0] for i in subset]).mean(0)
                rows[" + ".join(str(args.runs[i]) for i in subset)] = error(logp, labels)
        rows = dict(sorted(rows.items(), key=lambda row: row[1][0]))
    for name, (mean, ci) in rows.items():
        print(f"{name:60s} error {100 * mean:5.1f} ± {100 * ci:.1f}% ({args.split}, {episodes})")
    result = {"split": args.split, "episodes": episodes, "support_views": args.support_views,
              "query_views": args.query_views, "view_augment": args.view_augment,
              "error": {k: {"mean": m, "ci95": c} for k, (m, c) in rows.items()}}  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
