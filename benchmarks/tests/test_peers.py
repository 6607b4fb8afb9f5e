"""The peer benchmark's protocol: plain and funcvmap agree, missing peers report it, checks bite."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(_REPO))

from benchmarks.peers import run_peer  # noqa: E402
from benchmarks.peers.driver import (  # noqa: E402
    DEFAULT_IMPLS,
    PEER_IMPLS,
    combine_rounds,
    compare_gradients,
    prepare,
    run_impl,
    speedups,
)
from benchmarks.peers.inputs import load_data  # noqa: E402
from benchmarks.peers.model import load_init, param_names  # noqa: E402
from benchmarks.peers.spec import Spec, load_spec  # noqa: E402


def tiny_spec(**changes: object) -> Spec:
    """2-way 1-shot, 2 tasks, 2 inner steps, 28x28x1 images, width 8, float64 on CPU."""
    fields: dict = dict(
        name="tiny", ways=2, shots=1, queries=2, meta_batch=2, inner_steps=2, inner_lr=0.4,
        first_order=False, image_size=28, channels=1, hidden=8, pooling="stride",
        dtype="float64", device="cpu", warmup=0, iters=1, outer_lr=1e-3,
    )  # fmt: skip
    fields.update(changes)
    return Spec(**fields)


def test_plain_and_funcvmap_agree_in_subprocesses(tmp_path: Path) -> None:
    spec = prepare(tiny_spec(iters=2, threads=1), tmp_path, seed=0)
    impls = ("plain", "funcvmap")
    with ThreadPoolExecutor(2) as pool:  # one thread each, two processes at once
        runs = [pool.submit(run_impl, sys.executable, impl, spec, tmp_path) for impl in impls]
        results = {impl: run.result() for impl, run in zip(impls, runs, strict=True)}
    for impl, res in results.items():
        assert res["status"] == "ok", (impl, res.get("reason"), res.get("traceback"))
        assert len(res["times_ms"]) == 2 and res["median_ms"] > 0
        assert res["peak_memory_kind"] == "cpu_rss" and res["peak_memory_mib"] > 0
        assert res["allocator"] == "C library default" or "environment" in res["allocator"]
        if sys.platform == "linux":
            assert 0.0 <= res["cpu_steal_fraction"] <= 1.0
    rows = {r["impl"]: r for r in compare_gradients(results, "plain", rtol=1e-8)}
    assert rows["funcvmap"]["ok"], rows["funcvmap"]
    grad = torch.load(results["plain"]["grad_path"], weights_only=True)
    assert list(grad) == param_names(spec)
    assert float(grad["conv0.weight"].abs().max()) > 1e-3  # a real gradient, not zeros
    # The outer Adam step ran: the second iteration's meta-loss differs from the first.
    losses = results["plain"]["meta_losses"]
    assert losses[0] != losses[1]
    assert abs(results["funcvmap"]["meta_losses"][1] - losses[1]) < 1e-10
    assert results["plain"]["matmul_flop_per_s"] > 1e6
    assert "flops_per_iteration" not in results["funcvmap"]  # counted once, on plain


def test_plain_counts_the_flops_of_the_work(tmp_path: Path) -> None:
    """The FLOP count behind achieved FLOP/s grows with the inner steps and with second order."""
    flops = {}
    for steps, first in ((1, True), (1, False), (2, False)):
        spec = prepare(tiny_spec(inner_steps=steps, first_order=first), tmp_path, seed=0)
        res = run_peer.run("plain", spec, tmp_path / f"plain-{steps}-{first}.grad.pt")
        flops[steps, first] = res["flops_per_iteration"]
    assert 0 < flops[1, True] < flops[1, False] < flops[2, False]


@pytest.mark.parametrize(
    "changes",
    [
        {"pooling": "maxpool", "channels": 3},
        {"first_order": True, "per_task_backward": True},  # funcvmap ignores per_task_backward
    ],
)
def test_plain_and_funcvmap_agree_in_process(tmp_path: Path, changes: dict) -> None:
    spec = prepare(tiny_spec(**changes), tmp_path, seed=1)
    impls = (
        "plain",
        "funcvmap",
        "metafunc",
        "metafunc-reference",
        "metafunc-vmap",
        "metafunc-checkpoint",
    )
    results = {impl: run_peer.run(impl, spec, tmp_path / f"{impl}.grad.pt") for impl in impls}
    rows = {r["impl"]: r for r in compare_gradients(results, "plain", rtol=1e-8)}
    for impl in impls[1:]:
        assert rows[impl]["ok"], rows[impl]


def test_each_task_loop_peer_runs_its_official_backward_style_by_default(tmp_path: Path) -> None:
    """plain, learn2learn and higher backpropagate per task by default (their official examples
    do), the TorchOpt impls once on the mean; the ``-batch`` variants hold the whole batch, a
    spec's explicit choice overrides the default (not a variant's name), every result says which
    style ran, and the gradient is the same either way."""
    import importlib

    official = {"plain": True, "learn2learn": True, "higher": True, "torchopt": False}
    official["torchopt-metasgd"] = False
    for impl, per_task in official.items():
        module = importlib.import_module(run_peer.IMPLS[impl])  # peers import their library late
        assert module.PER_TASK_BACKWARD is per_task, impl
    variants = run_peer.BATCH_VARIANTS
    assert variants == {"plain-batch", "learn2learn-batch", "higher-batch"}
    for variant in run_peer.BATCH_VARIANTS:
        assert run_peer.IMPLS[variant] == run_peer.IMPLS[variant.removesuffix("-batch")]

    spec = prepare(tiny_spec(), tmp_path, seed=4)
    assert spec.per_task_backward is None
    results = {
        impl: run_peer.run(impl, spec, tmp_path / f"{impl}.grad.pt")
        for impl in ("plain", "plain-batch", "funcvmap")
    }
    forced = spec.replace(per_task_backward=False)
    results["plain-forced"] = run_peer.run("plain", forced, tmp_path / "forced.grad.pt")
    styles = {impl: res["backward"] for impl, res in results.items()}
    assert styles["plain"] == "per-task" and results["plain"]["spec"]["per_task_backward"]
    assert styles["plain-batch"] == styles["plain-forced"] == "whole-batch"
    assert styles["funcvmap"] == "one backward of the vmapped mean"
    assert results["funcvmap"]["spec"]["per_task_backward"] is None  # no task loop: untouched
    batch_of_forced = run_peer.run(
        "plain-batch", spec.replace(per_task_backward=True), tmp_path / "variant.grad.pt"
    )
    assert batch_of_forced["backward"] == "whole-batch"  # the variant's name wins
    rows = {r["impl"]: r for r in compare_gradients(results, "plain", rtol=1e-10)}
    assert all(row["ok"] for row in rows.values()), rows


def test_task_loop_refuses_an_unresolved_backward_style() -> None:
    from benchmarks.peers.base import resolve_backward, run_task_loop

    spec = tiny_spec()
    with pytest.raises(ValueError, match="resolve_backward"):
        run_task_loop(spec, [], lambda task: torch.zeros(()))
    assert resolve_backward(spec, True).per_task_backward is True
    assert resolve_backward(spec, True, force_batch=True).per_task_backward is False
    assert resolve_backward(spec.replace(per_task_backward=False), True).per_task_backward is False
    with pytest.raises(TypeError, match="per_task_backward"):
        tiny_spec(per_task_backward="yes")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], None), (["--batch-backward"], False), (["--per-task-backward"], True)],
)
def test_driver_backward_flags_set_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], expected: bool | None
) -> None:
    """No flag leaves each impl its official style; ``--batch-backward`` and
    ``--per-task-backward`` force one, and cannot be given together."""
    from benchmarks.peers import driver

    seen: list[bool | None] = []

    class Stop(Exception):
        pass

    def record(spec, impls, *args, **kwargs):
        seen.append(spec.per_task_backward)
        raise Stop

    monkeypatch.setattr(driver, "run_all", record)
    with pytest.raises(Stop):
        driver.main(["--settings", "omniglot-5w1s", "--workdir", str(tmp_path), *flags])
    assert seen == [expected]
    with pytest.raises(SystemExit):
        driver.main(["--batch-backward", "--per-task-backward", "--workdir", str(tmp_path)])


def test_first_order_differs_from_second_order(tmp_path: Path) -> None:
    second = prepare(tiny_spec(), tmp_path / "2", seed=2)
    first = prepare(tiny_spec(first_order=True), tmp_path / "1", seed=2)
    results = {
        "second": run_peer.run("plain", second, tmp_path / "second.grad.pt"),
        "first": run_peer.run("plain", first, tmp_path / "first.grad.pt"),
    }
    rows = {r["impl"]: r for r in compare_gradients(results, "second", rtol=1e-8)}
    assert rows["first"]["loss_rel_err"] < 1e-12  # same forward pass
    assert rows["first"]["grad_rel_err"] > 1e-4  # different gradient


def test_a_run_without_impls_compares_metafunc_with_every_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `metafunc bench peers` with no --impls must time metafunc itself, against all the peers
    assert DEFAULT_IMPLS[0] == "plain"
    assert {"metafunc", "metafunc-threads"} <= set(DEFAULT_IMPLS)
    assert set(PEER_IMPLS) <= set(DEFAULT_IMPLS) <= set(run_peer.IMPLS)
    from benchmarks.peers import driver

    asked: list[list[str]] = []

    class Stop(Exception):
        pass

    def record(spec, impls, *args, **kwargs):
        asked.append(list(impls))
        raise Stop

    monkeypatch.setattr(driver, "run_all", record)
    with pytest.raises(Stop):
        driver.main(["--settings", "omniglot-5w1s", "--workdir", str(tmp_path)])
    assert asked == [list(DEFAULT_IMPLS)]


@pytest.mark.parametrize("library", ["learn2learn", "higher", "torchopt"])
def test_missing_library_reports_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, library: str
) -> None:
    spec = prepare(tiny_spec(), tmp_path, seed=0)
    spec_path = spec.save(tmp_path / "spec.json")
    monkeypatch.setitem(sys.modules, library, None)  # makes `import library` raise ImportError
    out = tmp_path / "out.json"
    assert run_peer.main(["--impl", library, "--spec", str(spec_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["status"] == "missing"
    assert library in result["reason"]


def test_compare_gradients_flags_a_wrong_tensor(tmp_path: Path) -> None:
    spec = prepare(tiny_spec(inner_steps=1), tmp_path, seed=3)
    ref = run_peer.run("plain", spec, tmp_path / "ref.grad.pt")
    grad = torch.load(ref["grad_path"], weights_only=True)
    grad["bn2.bias"] = grad["bn2.bias"] * (1 + 1e-6)
    torch.save(grad, tmp_path / "bad.grad.pt")
    bad = {**ref, "grad_path": str(tmp_path / "bad.grad.pt")}
    rows = {r["impl"]: r for r in compare_gradients({"plain": ref, "bad": bad}, rtol=1e-8)}
    assert rows["plain"]["ok"] and rows["plain"]["grad_rel_err"] == 0.0
    assert not rows["bad"]["ok"] and rows["bad"]["worst_param"] == "bn2.bias"
    with pytest.raises(ValueError, match="reference"):
        compare_gradients({"bad": bad}, reference_impl="plain")


def test_rounds_combine_to_median_of_medians_and_ratio_spread() -> None:
    def run(ms: float, mem: float = 100.0, steal: float = 0.0) -> dict:
        return {"status": "ok", "median_ms": ms, "tasks_per_s": 32000 / ms,
                "peak_memory_mib": mem, "peak_memory_increase_mib": mem - 40,
                "cpu_steal_fraction": steal}  # fmt: skip

    rounds = [
        {"plain": run(100), "metafunc": run(80, mem=50), "torchopt": run(90)},
        {"plain": run(130), "metafunc": run(100, mem=60), "torchopt": run(120, steal=0.2)},
        {"plain": run(110), "metafunc": run(50, mem=55), "torchopt": {"status": "error"}},
    ]
    combined = combine_rounds(rounds)
    assert combined["plain"]["median_ms"] == 110 and combined["plain"]["tasks_per_s"] == 32000 / 110
    assert combined["plain"]["round_medians_ms"] == [100, 130, 110]
    assert combined["metafunc"]["median_ms"] == 80 and combined["metafunc"]["peak_memory_mib"] == 60
    assert combined["metafunc"]["round_peak_increase_mib"] == [10, 20, 15]
    assert combined["torchopt"]["status"] == "error"  # a failure in any round is reported
    ok = combine_rounds(rounds[:2])
    assert ok["torchopt"]["median_ms"] == 105 and ok["torchopt"]["cpu_steal_fraction"] == 0.1
    rows = [{"setting": "s", "impl": impl, **res} for impl, res in ok.items()]
    (mine,) = speedups(rows)
    assert mine["fastest peer"] == "torchopt" and mine["x fastest"] == round(105 / 90, 2)
    assert mine["x fastest by round"] == "1.12-1.20"  # 90/80 in round 1, 120/100 in round 2


def test_inputs_are_deterministic_and_checked(tmp_path: Path) -> None:
    a = prepare(tiny_spec(name="a"), tmp_path, seed=5)
    b = prepare(tiny_spec(name="b"), tmp_path, seed=5)
    c = prepare(tiny_spec(name="c"), tmp_path, seed=6)
    cpu, f64 = torch.device("cpu"), torch.float64
    ia, ib, ic = (load_init(s, cpu, f64) for s in (a, b, c))
    assert list(ia) == param_names(a)
    assert all(torch.equal(ia[k], ib[k]) for k in ia)
    assert not torch.equal(ia["conv0.weight"], ic["conv0.weight"])
    assert torch.equal(ia["bn0.weight"], torch.ones(8, dtype=f64))
    data = load_data(a, cpu, f64)
    assert data["support_y"].tolist() == [[0, 1], [0, 1]]
    assert data["query_y"].dtype == torch.int64
    spec_path = a.replace(init_path="a-init.pt", data_path="a-data.pt").save(tmp_path / "s.json")
    assert load_spec(spec_path) == a  # paths resolve against the spec's folder
    with pytest.raises(ValueError, match="shape"):
        load_init(a.replace(hidden=4), cpu, f64)
    with pytest.raises(ValueError, match="pooling"):
        a.replace(pooling="avg")


def test_bench_strategies_times_every_variant_in_turn(tmp_path, capsys):
    """benchmarks/bench_strategies.py on a tiny conv4: every variant timed each round, the
    table printed and the JSON written; a bad variant is refused."""
    from benchmarks import bench_strategies

    out = tmp_path / "s.json"
    args = ["--ways", "2", "--meta-batch", "2", "--hidden", "4", "--rounds", "2", "--out", str(out)]
    assert bench_strategies.main(args) == 0
    result = json.loads(out.read_text())
    names = [row["variant"] for row in result["rows"]]
    assert names == ["plain", *bench_strategies.VARIANTS]
    assert all(len(row["times_s"]) == 2 and row["median_s"] > 0 for row in result["rows"])
    assert result["rows"][0]["first_over_this"] == 1.0
    assert "plain / this" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_strategies.main([*args, "--variants", "plain,nope"])
    # another algorithm: its own variants, the first as the base; plain is MAML's alone
    assert bench_strategies.main([*args, "--algorithm", "reptile", "--variants", "auto,loop"]) == 0
    result = json.loads(out.read_text())
    assert [row["variant"] for row in result["rows"]] == ["auto", "loop"]
    assert result["config"]["algorithm"] == "reptile" and "auto / this" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_strategies.main([*args, "--algorithm", "reptile", "--variants", "plain,auto"])


def test_driver_results_name_the_machine_and_commit(tmp_path: Path) -> None:
    """The written results say where and from what they came: the JSON's machine (CPU, its
    family and model, the commit) and the markdown's first line."""
    from benchmarks.peers import driver

    out = tmp_path / "r.json"
    args = ["--check", "--settings", "omniglot-5w1s", "--impls", "plain,plain-batch,metafunc"]
    args += ["--orders", "second", "--workdir", str(tmp_path), "--out", str(out)]
    assert driver.main(args) == 0
    result = json.loads(out.read_text())
    styles = {row["impl"]: row["backward"] for row in result["rows"]}  # the check says which ran
    assert styles["plain"] == "per-task" and styles["plain-batch"] == "whole-batch"
    assert all(row["ok"] for row in result["rows"]) and result["per_task_backward"] is None
    where = result["machine"]
    assert where["cpu"] and where["cpu_count"] >= 1 and "commit" in where
    header = out.with_suffix(".md").read_text().splitlines()[0]
    assert header.startswith(where["date"]) and f"commit {where['commit']}" in header


def test_max_seconds_stops_timing_after_three_iterations(tmp_path: Path) -> None:
    """A time cap (a lent GPU's budget) stops the timed loop once it is spent, never before
    three timed iterations; without one every iteration is timed."""
    capped = prepare(tiny_spec(iters=6, max_seconds=1e-9), tmp_path / "capped", seed=0)
    res = run_peer.run("plain", capped, tmp_path / "capped.grad.pt")
    assert res["status"] == "ok" and res["timed_iters"] == 3 == len(res["times_ms"])
    full = prepare(tiny_spec(iters=4), tmp_path / "full", seed=0)
    assert run_peer.run("plain", full, tmp_path / "full.grad.pt")["timed_iters"] == 4
    with pytest.raises(ValueError, match="max_seconds=0"):
        tiny_spec(max_seconds=0)
    assert load_spec(capped.save(tmp_path / "spec.json")).max_seconds == 1e-9


def test_commit_falls_back_to_the_environment_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a copy of the tree without .git (a lent GPU machine) results still name the commit,
    from $METAFUNC_COMMIT; in a checkout git's answer wins."""
    from benchmarks import bench_sampler

    monkeypatch.setenv("METAFUNC_COMMIT", "abc1234")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-such-git-dir"))
    assert bench_sampler.commit() == "abc1234"
    monkeypatch.delenv("GIT_DIR")
    if bench_sampler.commit() is not None:  # this is a git checkout
        assert bench_sampler.commit() != "abc1234"


def test_bench_memory_writes_each_row_as_it_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped part-way (a lent GPU's time running out) keeps the rows it measured: the
    JSON is rewritten after every one."""
    from benchmarks import bench_memory

    out = tmp_path / "m.json"
    seen: list[int] = []

    def fake_run_impl(python_exe, impl, spec, workdir, **kwargs):  # type: ignore[no-untyped-def]
        if out.exists():
            seen.append(len(json.loads(out.read_text())["rows"]))
        return {"status": "ok", "median_ms": 1.0, "peak_memory_mib": 2.0}

    monkeypatch.setattr(bench_memory, "run_impl", fake_run_impl)
    monkeypatch.setattr(bench_memory, "prepare", lambda spec, workdir, seed: spec)
    args = ["--steps", "1,2", "--impls", "metafunc,metafunc-checkpoint", "--out", str(out)]
    assert bench_memory.main(args) == 0
    assert seen == [1, 2, 3]
    assert len(json.loads(out.read_text())["rows"]) == 4
    assert out.with_suffix(".md").read_text().count("| ok |") == 4


@pytest.mark.skipif(sys.platform != "linux", reason="benchmarks/gpu.sh is a bash script for Linux")
def test_gpu_script_runs_what_fits_its_budget_and_packs_the_results(tmp_path: Path) -> None:
    """benchmarks/gpu.sh, rehearsed on the CPU: a step runs when its estimate fits the budget,
    the rest are skipped and say why, and what ran is packed into the one archive that comes
    back from a lent machine. (The whole script, every step, was rehearsed by hand: HISTORY.)"""
    import os
    import subprocess
    import tarfile

    out, res = tmp_path / "out", tmp_path / "res"
    env = {**os.environ, "DEVICE": "cpu", "PY": sys.executable, "RES": str(res)}
    env["WHEELS"] = str(tmp_path / "no-wheels")  # this machine's own environment, as it is
    env.pop("PYTHONPATH", None)

    def gpu_sh(**extra: str) -> str:
        proc = subprocess.run(
            ["bash", str(_REPO / "benchmarks" / "gpu.sh"), str(out)],
            env={**env, **extra}, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    log = gpu_sh(BUDGET="60")  # 'environment' (30 s) fits; 'check' (120 s) does not
    assert "== environment (estimated 30 s, stopped after " in log
    assert "== environment: exit 0" in log and "== check: skipped, estimated 120 s" in log
    assert "== precision: skipped" in log and "gpu.sh: done" in log
    [archive] = out.glob("gpu-results-cpu-rehearsal-*.tgz")
    with tarfile.open(archive) as tar:
        [member] = tar.getmembers()
        versions = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    assert member.name.startswith("gpu-cpu-rehearsal-") and "metafunc 0.1.0" in versions
    assert (out / "gpu.log").read_text().count("gpu.sh: done") == 1
    log = gpu_sh(BUDGET="60", SKIP="environment")
    assert "== environment: skipped (SKIP)" in log
