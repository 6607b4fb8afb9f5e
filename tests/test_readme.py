"""The README's worked example, CAVIA written from metafunc's parts, runs as printed: its
meta-gradient equals an independent per-task ``torch.autograd`` reference in float64, and its
training loop makes adaptation work."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import metafunc as mf
from metafunc import TaskBatch, tree

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Writing your own algorithm: CAVIA in 30 lines"


def section_blocks() -> list[str]:
    """The python code blocks of the CAVIA section, in order."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text[text.index(SECTION) + len(SECTION) :]
    body = body[: body.find("\n## ")] if "\n## " in body else body
    return re.findall(r"```python\n(.*?)```", body, re.S)


def run_blocks(monkeypatch: pytest.MonkeyPatch, count: int) -> dict:
    """Execute the first ``count`` blocks in one fresh module, as a reader pasting them would."""
    module = types.ModuleType("readme_cavia")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for code in section_blocks()[:count]:
        exec(compile(code, str(README), "exec"), module.__dict__)
    return module.__dict__


def sine_tasks(gen: torch.Generator, tasks: int, points: int = 10) -> TaskBatch:
    amp = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.1, 5.0, generator=gen)
    phase = torch.empty(tasks, 1, 1, dtype=torch.float64).uniform_(0.0, 3.14, generator=gen)
    x = torch.empty(tasks, 2 * points, 1, dtype=torch.float64).uniform_(-5, 5, generator=gen)
    y = amp * torch.sin(x - phase)
    return TaskBatch(x[:, :points], y[:, :points], x[:, points:], y[:, points:])


def ref_mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    """mlp((5, 16, 16, 1)) written out with matrix products."""
    h = torch.relu(x @ p["fc0.weight"].T + p["fc0.bias"])
    h = torch.relu(h @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def ref_cavia_grad(
    params: dict, batch: TaskBatch, *, context: int, lr: float, steps: int, first_order: bool
) -> dict:
    """CAVIA's meta-gradient task by task: φ = 0, ``steps`` SGD steps on φ alone by
    ``torch.autograd.grad(create_graph=True)``, the query loss averaged over tasks,
    differentiated with respect to θ."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def mse(x: torch.Tensor, y: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([x, phi.expand(x.shape[0], context)], dim=1)
        return ((ref_mlp(theta, inputs) - y) ** 2).mean()

    losses = []
    for t in range(batch.support_x.shape[0]):
        phi = torch.zeros(context, dtype=torch.float64, requires_grad=True)
        for _ in range(steps):
            loss = mse(batch.support_x[t], batch.support_y[t], phi)
            (g,) = torch.autograd.grad(loss, phi, create_graph=not first_order)
            phi = phi - lr * g
        losses.append(mse(batch.query_x[t], batch.query_y[t], phi))
    grads = torch.autograd.grad(torch.stack(losses).mean(), list(theta.values()))
    return dict(zip(theta, grads, strict=True))


def rel_err(a: dict, b: dict) -> float:
    assert tree.structure(a) == tree.structure(b)
    return float(tree.global_norm(tree.sub(a, b)) / tree.global_norm(b))


def test_cavia_example_is_short():
    blocks = section_blocks()
    assert len(blocks) == 2, "the section holds the algorithm and its training loop"
    assert len(blocks[0].splitlines()) < 40, "the issue promises CAVIA in under 40 lines"


def test_cavia_meta_gradient_matches_per_task_autograd(monkeypatch):
    CAVIA = run_blocks(monkeypatch, 1)["CAVIA"]
    alg = CAVIA(mf.mlp((1 + 4, 16, 16, 1), init="xavier"), inner_lr=0.3, inner_steps=3)
    gen = torch.Generator().manual_seed(0)
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 4)
    grads, loss, metrics = alg.meta_grad(meta, batch)
    assert set(grads) == {"params"}, "θ is meta-learned; φ lives only inside a task"
    kw = {"context": 4, "lr": 0.3, "steps": 3}
    ref = ref_cavia_grad(meta["params"], batch, first_order=False, **kw)
    assert rel_err(grads["params"], ref) <= 1e-8
    # The second-order terms matter here, so the comparison above can tell them apart.
    first = ref_cavia_grad(meta["params"], batch, first_order=True, **kw)
    assert rel_err(first, ref) > 1e-3
    assert float(metrics["loss"]) == pytest.approx(float(loss))
    # Adaptation moves φ, not θ: after 0 steps the predictions are the un-adapted network's.
    preds = alg.adapt_and_predict(meta, batch, 2)
    zero = torch.zeros(4, 10, 4, dtype=torch.float64)
    plain = ref_mlp(meta["params"], torch.cat([batch.query_x, zero], dim=-1))
    torch.testing.assert_close(preds[:, 0], plain, rtol=1e-12, atol=1e-12)
    assert float((preds[:, 2] - preds[:, 0]).abs().max()) > 1e-3


@pytest.mark.slow
def test_cavia_example_training_makes_adaptation_work(monkeypatch, capsys):
    ns = run_blocks(monkeypatch, 2)
    alg, meta, test = ns["alg"], ns["meta"], ns["test"]
    steps = alg.inner_steps
    init = alg.init(torch.Generator().manual_seed(0))
    before = alg.evaluate(init, test, steps=steps)["loss"].mean(0)
    after = alg.evaluate(meta, test, steps=steps)["loss"].mean(0)
    pre, post = float(after[0]), float(after[-1])
    printed = capsys.readouterr().out.strip()
    print(
        f"cavia: at init pre {float(before[0]):.3f} post {float(before[-1]):.3f}; "
        f"trained pre {pre:.3f} post {post:.3f}; the README printed {printed}"
    )
    assert post < 0.5 * pre  # adapting φ does the work
    assert post < 0.6 * float(before[-1])  # and meta-training θ is what made it work


def test_cavia_example_compiles_unchanged(monkeypatch):
    """The README's CAVIA, as printed, runs as one compiled training step (``compile_step``)
    and follows the eager step in float64."""
    ns = run_blocks(monkeypatch, 1)
    alg = ns["CAVIA"](mf.mlp((5, 16, 16, 1)), context=4, inner_lr=0.5, inner_steps=2)
    meta = tree.cast(alg.init(torch.Generator().manual_seed(0)), torch.float64)
    gen = torch.Generator().manual_seed(1)
    batches = [sine_tasks(gen, 4) for _ in range(3)]
    finals = []
    for mode in (None, "default"):
        step = mf.compile_step(alg, mf.optim.adam(1e-2), mode=mode, backend="aot_eager")
        state = step.init(meta)
        for i, batch in enumerate(batches):
            state, metrics = step(state, batch, iteration=i)
            assert bool(metrics["finite"])
        finals.append(state.meta)
    assert step.whole
    assert rel_err(finals[1], finals[0]) <= 1e-12


@pytest.mark.slow
def test_the_commands_run_as_printed(tmp_path, data_root, monkeypatch):
    """The README's command block, line by line, in a fresh folder (Omniglot from
    ``METAFUNC_DATA``)."""
    import shlex
    import subprocess

    text = README.read_text(encoding="utf-8")
    body = text[text.index("## The command") :]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    commands = [line for line in lines if line.startswith("metafunc ")]
    assert len(commands) >= 4
    exe = Path(sys.executable).with_name("metafunc")
    env = {**__import__("os").environ, "METAFUNC_DATA": str(data_root)}
    for command in commands:
        argv = [str(exe), *shlex.split(command)[1:]]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "runs" / "omni" / "eval.json").is_file()


def test_the_readme_is_a_newcomers_page():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200
