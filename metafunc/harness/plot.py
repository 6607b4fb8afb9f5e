"""``metafunc plot RUN_DIR``: learning curves, and the MAML paper's sinusoid figure.

Needs matplotlib (``pip install 'metafunc[plot]'``); imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from metafunc.data import SinusoidTasks, TaskBatch
from metafunc.harness.config import ConfigError
from metafunc.harness.run import load_run

__all__ = ["plot_curves", "plot_run", "plot_sinusoid"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ConfigError(
            "metafunc plot needs matplotlib: pip install 'metafunc[plot]' (or matplotlib)."
        ) from err
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dir: str | Path, out: str | Path) -> Path:
    """One panel per logged metric of ``metrics.jsonl`` against the training step; validation
    scores (``--eval-every``: ``val_loss``, ``val_accuracy``) are drawn as points in the panel of
    the training metric they match."""
    plt = _pyplot()
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"metafunc plot {run_dir}: no metrics.jsonl in that folder.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ConfigError(f"metafunc plot {run_dir}: metrics.jsonl is empty; train first.")
    logged = list(dict.fromkeys(k for r in records for k in r if k not in ("step", "time")))
    names = [k for k in logged if not (k.startswith("val_") and k[4:] in logged)]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for key, style in ((name, {"lw": 1}), (f"val_{name}", {"marker": "o", "ms": 3})):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points and (key == name or key in logged):
                label = "validation" if key != name or name.startswith("val_") else "training"
                ax.plot(*zip(*points, strict=True), label=label, **style)
        ax.set_xlabel("meta-iteration")
        ax.set_title(name.removeprefix("val_").replace("_", " "))
        ax.grid(alpha=0.3)
        if f"val_{name}" in logged:
            ax.legend()
        if name.endswith("loss") and min(r.get(name, 1.0) for r in records) > 0:
            ax.set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_sinusoid(run_dir: str | Path, out: str | Path, *, seed: int = 0, tasks: int = 3) -> Path:
    """The MAML paper's figure 2: for ``tasks`` test sinusoids, the true function, the
    support points, and the prediction before adaptation and after 1 and 10 inner steps
    (fewer when the run's ``eval_inner_steps`` is lower)."""
    plt = _pyplot()
    run, meta, _ = load_run(run_dir)
    cfg = run.config
    if not cfg.is_regression:
        raise ConfigError(f"metafunc plot {run_dir}: the sinusoid figure needs a sinusoid run.")
    sampler = SinusoidTasks(shots=cfg.eval_shots or cfg.shots, dtype=run.dtype, device=run.device)
    batch, params = sampler.sample_with_params(tasks, torch.Generator().manual_seed(seed))
    grid = torch.linspace(-5.0, 5.0, 200, dtype=run.dtype, device=run.device)
    grid_x = grid.view(1, -1, 1).expand(tasks, -1, -1)
    truth = params.evaluate(grid_x)
    shown = sorted({0, min(1, cfg.eval_inner_steps), min(10, cfg.eval_inner_steps)})
    with torch.no_grad():
        preds = run.eval_algorithm.adapt_and_predict(
            meta, TaskBatch(batch.support_x, batch.support_y, grid_x, truth), shown[-1]
        )
    fig, axes = plt.subplots(1, tasks, figsize=(4.5 * tasks, 3.5), squeeze=False)
    for t, ax in enumerate(axes[0]):
        ax.plot(grid.cpu(), truth[t, :, 0].cpu(), "r", lw=2, label="ground truth")
        for s, style in zip(shown, (":", "--", "-"), strict=False):
            label = "pre-update" if s == 0 else f"{s} grad step{'s' if s > 1 else ''}"
            ax.plot(grid.cpu(), preds[t, s, :, 0].cpu(), style, color="C0", label=label)
        ax.plot(
            batch.support_x[t, :, 0].cpu(), batch.support_y[t, :, 0].cpu(), "^", color="purple",
            label=f"{batch.support_x.shape[1]} points used for gradient",
        )  # fmt: skip
        ax.set_ylim(-5.5, 5.5)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{cfg.algorithm}, K={batch.support_x.shape[1]}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_run(
    run_dir: str | Path, *, out_dir: str | Path | None = None, seed: int = 0
) -> list[Path]:
    """Every figure of a run folder (``curves.png``, and ``sinusoid.png`` for a sinusoid run),
    written to ``out_dir`` (default: the run folder); returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"metafunc plot {run_dir}: no such folder.")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(run_dir, out / "curves.png")]
    config = run_dir / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("dataset") == "sinusoid":
        written.append(plot_sinusoid(run_dir, out / "sinusoid.png", seed=seed))
    return written
