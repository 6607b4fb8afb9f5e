"""The metafunc command: a short run end to end, exact resume after SIGKILL, clear user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metafunc.cli import main
from metafunc.harness import CheckpointError, latest_checkpoint, load_checkpoint

QUICK = [
    "--iterations",
    "6",
    "--meta-batch",
    "4",
    "--eval-episodes",
    "8",
    "--eval-batch",
    "4",
    "--log-every",
    "2",
    "--checkpoint-every",
    "3",
    "--strategy",
    "loop",
    "--quiet",
]


def test_train_writes_a_run_folder_and_eval_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "eval.json", "ckpt-00000006.safetensors"} <= names
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and all("loss" in x for x in lines)
    assert all(x["outer_lr"] == 1e-3 for x in lines)  # Adam's constant outer rate
    results = json.loads((run / "eval.json").read_text())
    assert set(results["loss"]) == {"0", "1", "10"} and results["episodes"] == 8
    assert main(["eval", str(run), "--episodes", "4"]) == 0
    assert "MSE after 10 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_the_default_run_adapts_far_below_the_unadapted_error(tmp_path, capsys):
    # `metafunc train` with no flags (the README's first command), in a chosen folder
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "MSE after  0 steps" in out and "MSE after 10 steps" in out
    mse = {k: v["mean"] for k, v in json.loads((run / "eval.json").read_text())["loss"].items()}
    assert json.loads((run / "config.json").read_text())["iterations"] == 5000
    assert mse["1"] < 0.5 * mse["0"] and mse["10"] < 0.3 * mse["0"], mse


def test_plot_writes_curves_and_the_sinusoid_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["curves.png", "sinusoid.png"]
    for p in printed:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "algorithm", ["fomaml", "anil", "metasgd", "mamlpp", "reptile", "imaml", "baseline"]
)
def test_every_sinusoid_algorithm_trains_through_the_harness(tmp_path, algorithm):
    run = tmp_path / algorithm
    extra = ["--inner-steps", "2", "--eval-inner-steps", "2", "--report-steps", "0", "2"]
    argv = ["train", "--algorithm", algorithm, "--run-dir", str(run), *QUICK]
    assert main(argv + (extra if algorithm == "mamlpp" else [])) == 0
    results = json.loads((run / "eval.json").read_text())
    assert all(torch.isfinite(torch.tensor(v["mean"])) for v in results["loss"].values())
    assert latest_checkpoint(run) is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--algorithm", "nope"], "argument --algorithm: invalid choice: 'nope'"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--preset", "nope"], "unknown preset"),
        (["--iterations", "0"], "iterations must be an integer >= 1"),
        (["--iterations", "-5"], "iterations must be an integer >= 1"),
        (["--meta-batch", "0"], "meta_batch must be an integer >= 1"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--dataset", "omniglot", "--data-root", "/nonexistent"], "does not exist"),
        (["--algorithm", "protonet"], "algorithm='protonet' classifies"),
        (["--algorithm", "imaml", "--lam", "0"], "lam (iMAML's proximal weight) must be > 0"),
        (["--inner-optimizer", "rmsprop"], "argument --inner-optimizer: invalid choice"),
        (["--model", "conv4"], "model='conv4' takes images"),
        (["--algorithm", "mamlpp"], "eval_inner_steps (10) must be <= inner_steps (1)"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, capsys, argv, message):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    try:  # a value outside a flag's choices stops argparse itself, with status 2
        code = main(["train", "--run-dir", str(tmp_path / "r"), *QUICK, *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"iterations": 5, "learning_rate": 0.1}))
    assert main(["train", "--config", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['learning_rate']" in err and "Traceback" not in err
    bad.write_text(json.dumps({"iterations": "many"}))
    assert main(["train", "--config", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "iterations must be an integer" in err and "Traceback" not in err
    toml = tmp_path / "c.toml"
    toml.write_text(
        "iterations = 2\nmeta_batch = 2\neval_episodes = 2\neval_batch = 2\nstrategy = 'loop'\n"
    )
    assert main(["train", "--config", str(toml), "--run-dir", str(tmp_path / "t"), "--quiet"]) == 0


def test_resume_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_corrupt_and_pickled_checkpoints_are_refused(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable metafunc checkpoint"):
        load_checkpoint(ckpt, {"meta": {}})

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, ckpt)  # a pickle that would run code
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(ckpt, {"meta": {}})
    assert not (tmp_path / "pwned").exists()
    assert main(["eval", str(run)]) == 2


def test_truncated_checkpoint_on_resume_is_a_user_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--iterations", "9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ckpt.name in err and "not a readable metafunc checkpoint" in err
    assert "Traceback" not in err


def test_a_diverging_run_stops_naming_step_task_and_leaves(tmp_path, capsys):
    # Adam's first steps move every weight by about outer_lr: 1e30 overflows the next forward.
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), *QUICK, "--outer-lr", "1e30", "--checkpoint-every", "1"]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "step 1:" in err and "first diverging task in the meta-batch: 0" in err
    assert "not finite at ['params.fc0.bias'" in err and "Traceback" not in err
    assert [p.name for p in sorted(run.glob("ckpt-*"))] == ["ckpt-00000001.safetensors"]
    good = load_file(str(run / "ckpt-00000001.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    run = tmp_path / "run"
    args = ["--iterations", "100000", "--meta-batch", "2", "--strategy", "loop", "--quiet"]
    cmd = [sys.executable, "-m", "metafunc", "train", "--run-dir", str(run), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the training loop
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by signal at step" in out and f"metafunc train --resume {run}" in out
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and not list(run.glob(".ckpt-*"))
    step = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert ckpt.name == f"ckpt-{step:08d}.safetensors" and 0 <= step < 100000
    assert not (run / "eval.json").exists()


def _final(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    return load_file(str(ckpt))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    args = [
        "--iterations",
        "60",
        "--meta-batch",
        "5",
        "--eval-episodes",
        "4",
        "--eval-batch",
        "4",
        "--checkpoint-every",
        "4",
        "--strategy",
        "loop",
        "--quiet",
    ]
    cmd = [sys.executable, "-m", "metafunc", "train"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([*cmd, "--run-dir", str(straight), *args], check=True, timeout=300)
    proc = subprocess.Popen([*cmd, "--run-dir", str(killed), *args])
    deadline = time.time() + 240
    while time.time() < deadline:
        ckpt = latest_checkpoint(killed) if killed.exists() else None
        if ckpt is not None and ckpt.name >= "ckpt-00000012":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = latest_checkpoint(killed)
    assert stopped is not None and stopped.name < "ckpt-00000060.safetensors", "killed too late"
    subprocess.run([*cmd, "--resume", str(killed), "--quiet"], check=True, timeout=300)
    assert not list(killed.glob(".ckpt-*"))  # a temporary file a kill left is cleaned up
    a, b = _final(straight), _final(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_runs_the_checkout_scripts(capfd):
    assert main(["bench", "memory", "--help"]) == 0
    assert "inner steps" in capfd.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "nope"])


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]


def test_resume_with_more_iterations_extends_the_run_exactly(tmp_path):
    short, straight = tmp_path / "short", tmp_path / "straight"
    assert main(["train", "--run-dir", str(short), *QUICK, "--iterations", "3"]) == 0
    assert main(["train", "--resume", str(short), "--iterations", "6", "--quiet"]) == 0
    assert main(["train", "--run-dir", str(straight), *QUICK]) == 0
    a = load_file(str(latest_checkpoint(short)))
    b = load_file(str(latest_checkpoint(straight)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((short / "config.json").read_text())["iterations"] == 6
    assert main(["train", "--resume", str(short), "--iterations", "2", "--quiet"]) == 2


def test_auto_strategy_is_measured_skips_what_does_not_fit_and_is_recorded(
    tmp_path, capsys, monkeypatch
):
    from metafunc.algorithms import MAML

    timed = MAML.meta_grad

    def vmap_runs_out_of_memory(self, *args, **kwargs):
        if self.strategy == "vmap":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return timed(self, *args, **kwargs)

    monkeypatch.setattr(MAML, "meta_grad", vmap_runs_out_of_memory)
    argv = ["train", "--run-dir", str(tmp_path / "run"), *QUICK[:-3], "--threads", "2"]
    assert main(argv) == 0
    times = json.loads((tmp_path / "run" / "strategy.json").read_text())
    assert set(times) == {"loop", "vmap", "threads"} and times["vmap"] == "out of memory"
    measured = {k: v for k, v in times.items() if isinstance(v, float)}
    assert all(v > 0 for v in measured.values()) and len(measured) == 2
    chosen = json.loads((tmp_path / "run" / "config.json").read_text())["strategy"]
    assert chosen == min(measured, key=measured.__getitem__)  # saved: a resume uses the same
    assert f"strategy 'auto': {chosen}, the fastest of" in capsys.readouterr().out

    def nothing_fits(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(MAML, "meta_grad", nothing_fits)
    assert main(["train", "--run-dir", str(tmp_path / "oom"), *QUICK[:-3]]) == 2
    assert "found no strategy that fits in memory" in capsys.readouterr().err


def test_auto_strategy_candidates_per_device():
    from metafunc.strategies import strategy_candidates

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert strategy_candidates(cpu, 1, 16) == [("loop", None), ("vmap", None)]
    assert strategy_candidates(cpu, 4, 16)[-1] == ("threads", None)
    assert strategy_candidates(cuda, 8, 16) == [
        ("loop", None), ("vmap", None), ("chunked", 8), ("chunked", 4),
    ]  # fmt: skip
    assert strategy_candidates(cuda, 8, 3) == [("loop", None), ("vmap", None)]


def test_auto_strategy_of_a_pretraining_run_is_the_device_rule_without_timing(
    monkeypatch, intra_op_threads
):
    from metafunc.harness import run as harness_run
    from metafunc.harness.config import Config

    def no_build(cfg):
        raise AssertionError("a pretraining run has no meta-batch to time: nothing to build")

    monkeypatch.setattr(harness_run, "build", no_build)
    with intra_op_threads(2):
        cfg = Config(algorithm="baseline", dataset="omniglot", strategy="auto")
        resolved, times = harness_run.resolve_strategy(cfg)
    assert resolved.strategy == "loop" and times == {}


def test_auto_strategy_builds_one_meta_gradient_per_candidate_and_times_the_last_iteration(
    monkeypatch, intra_op_threads
):
    from metafunc.algorithms import MAML
    from metafunc.harness import run as harness_run
    from metafunc.harness.config import Config

    built: list[str] = []
    iterations: set[int] = set()

    def compiled_meta_grad(self, mode="default", *, backend="inductor"):  # no real compile
        built.append(self.strategy)

        def meta_grad(meta, batch, *, iteration=0):
            iterations.add(iteration)
            return self.meta_grad(meta, batch, iteration=iteration)

        return meta_grad

    monkeypatch.setattr(MAML, "compiled_meta_grad", compiled_meta_grad)
    with intra_op_threads(2):
        cfg = Config(strategy="auto", compile="default", iterations=7, meta_batch=4)
        resolved, times = harness_run.resolve_strategy(cfg)
    # the run's own (here: compiled) meta-gradient, built once per candidate although each
    # runs four times (a warm-up and three timed rounds), at the run's last iteration (the
    # 'auto' one is the run's own, built with it and never called)
    assert sorted(built) == ["auto", "loop", "threads", "vmap"] and iterations == {6}
    assert set(times) == {"loop", "vmap", "threads"} and resolved.strategy in times


def test_compile_auto_skips_a_compile_that_would_not_pay_and_records_why(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    record = json.loads((run / "compile.json").read_text())
    assert record["choice"] == "off" and "would not pay back over 6 steps" in record["why"]
    assert record["eager_ms"] > 0 and "compiled_ms" not in record  # nothing was compiled
    assert json.loads((run / "config.json").read_text())["compile"] == "off"  # kept for a resume


@pytest.mark.slow
def test_compile_auto_compiles_when_it_pays_and_remembers_the_compile(tmp_path, monkeypatch):
    from metafunc.harness import Config, compiling

    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiling, "COMPILE_GUESS_S", 0.0)  # as if compiling cost nothing
    run = tmp_path / "run"
    args = [*QUICK, "--strategy", "vmap", "--iterations", "8"]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    record = json.loads((run / "compile.json").read_text())
    assert record["cache"] == "cold" and record["compile_s"] > 0 and record["compiled_ms"] > 0
    assert record["choice"] in ("default", "off") and "per step" in record["why"]
    assert record["precompiled"] == "saved"
    assert json.loads((run / "config.json").read_text())["compile"] == record["choice"]
    known = json.loads((tmp_path / "cache" / "compile-times.json").read_text())
    (entry,) = known.values()
    assert entry["cold_s"] == record["compile_s"]
    # the same config again (another seed) loads the step precompiled by the first run
    monkeypatch.setattr(compiling, "LOAD_GUESS_S", 0.0)
    again = tmp_path / "again"
    assert main(["train", "--run-dir", str(again), *args, "--seed", "3"]) == 0
    record = json.loads((again / "compile.json").read_text())
    assert record["cache"] == record["precompiled"] == "loaded"
    (entry,) = json.loads((tmp_path / "cache" / "compile-times.json").read_text()).values()
    assert entry["loaded_s"] == record["compile_s"]
    assert [p.name for p in (tmp_path / "cache" / "steps").iterdir()] == [
        compiling.step_cache(Config.from_dict(json.loads((run / "config.json").read_text()))).name
    ]


@pytest.mark.slow
def test_a_compiled_run_resumes_bit_identical_to_an_uninterrupted_one(tmp_path):
    args = [*QUICK, "--strategy", "vmap", "--compile", "default"]
    straight, short = tmp_path / "straight", tmp_path / "short"
    assert main(["train", "--run-dir", str(straight), *args]) == 0
    assert main(["train", "--run-dir", str(short), *args, "--iterations", "3"]) == 0
    assert main(["train", "--resume", str(short), "--iterations", "6", "--quiet"]) == 0
    a, b = _final(straight), _final(short)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eager = tmp_path / "eager"
    assert main(["train", "--run-dir", str(eager), *QUICK, "--strategy", "vmap"]) == 0
    c = _final(eager)  # the compiled run follows the eager one (float32 rounding apart)
    assert all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)


def test_every_flag_explains_itself_in_groups(capsys):
    from dataclasses import fields

    from metafunc.harness.config import CHOICES, FLAGS, GROUPS, Config

    keys = {f.name for f in fields(Config)} - {"preset"}
    assert keys == set(FLAGS), "every config key has a group and a help text"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for group in GROUPS:
        assert f"{group} options:" in text
    flat = " ".join(text.split())
    for key in keys:
        flag = "--" + key.replace("_", "-")
        start = flat.index(f" {flag}", flat.index("task options:"))
        entry = flat[start : start + 400]
        assert "default" in entry, f"{flag} shows no default"
        for choice in CHOICES.get(key, ()):
            assert choice in entry, f"{flag} does not list {choice}"


REFUSALS = [
    ("--train-ways", "10", "protonet, r2d2, metaoptnet"),
    ("--inner-optimizer", "adam", "reptile, imaml, baseline"),
    ("--anneal", None, "reptile"),
    ("--lam", "3", "imaml"),
    ("--cg-steps", "7", "imaml"),
    ("--finetune", "all", "baseline"),
    ("--weights", "w.safetensors", "baseline"),
    ("--batch-size", "64", "baseline"),
    ("--first-order", None, "maml, anil, metasgd, mamlpp"),
    ("--inner-checkpoint", None, "maml, fomaml, anil, metasgd, mamlpp"),
    ("--halve-every", "100", "protonet, r2d2, metaoptnet"),
    ("--head", "ridge", "metaoptnet"),
]


def test_every_algorithm_specific_key_has_a_refusal_case():
    from metafunc.harness.config import ONLY_FOR

    assert {flag[2:].replace("-", "_") for flag, _, _ in REFUSALS} == set(ONLY_FOR)


@pytest.mark.parametrize(("flag", "value", "owners"), REFUSALS)
def test_a_flag_of_another_algorithm_is_refused_naming_its_algorithms(capsys, flag, value, owners):
    from metafunc.harness.config import ALGORITHMS, ONLY_FOR

    key = flag[2:].replace("-", "_")
    other = next(a for a in ALGORITHMS if a not in ONLY_FOR[key])
    argv = ["train", "--algorithm", other, flag, *([value] if value else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{key} ({flag}) applies to {owners}, not {other}" in err and "Traceback" not in err


def test_missing_data_names_the_flags_that_fix_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("METAFUNC_DATA", raising=False)
    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--dataset", "omniglot", "--shots", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "--download" in err and "root=" not in err
    (tmp_path / "empty").mkdir()
    argv = ["train", "--dataset", "omniglot-lake", "--shots", "1", "--data-root"]
    assert main([*argv, str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "omniglot-py/images_" in err and "--download" in err and "download=True" not in err
    assert main(["train", "--dataset", "cifar-fs", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "--download" not in err


def _fake_omniglot_zip(folder: Path, stem: str, characters: int) -> str:
    """An Omniglot-layout zip (``stem/<Alphabet>/<character>/*.png``); returns its md5."""
    import hashlib
    import io
    import zipfile

    from PIL import Image

    path = folder / f"{stem}.zip"
    gen = torch.Generator().manual_seed(len(stem))
    with zipfile.ZipFile(path, "w") as z:
        for c in range(characters):
            for d in range(20):
                pixels = (torch.rand(105, 105, generator=gen) > 0.1).to(torch.uint8) * 255
                buf = io.BytesIO()
                Image.fromarray(pixels.numpy()).save(buf, format="PNG")
                z.writestr(
                    f"{stem}/Alphabet_{c % 2}/character{c:02d}/{c}_{d:02d}.png", buf.getvalue()
                )
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_fetches_omniglot_from_a_server_and_trains(tmp_path, monkeypatch):
    """--download through the command, against an HTTP server on 127.0.0.1 serving zips in
    Omniglot's layout (their md5s stand in for the official ones)."""
    import functools
    import http.server
    import threading

    from metafunc.data import omniglot

    served = tmp_path / "served"
    served.mkdir()
    for source, stem in (("background", "images_background"), ("evaluation", "images_evaluation")):
        md5 = _fake_omniglot_zip(served, stem, characters=6)
        monkeypatch.setitem(omniglot.OMNIGLOT_SOURCES, source, (stem, md5))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("METAFUNC_OMNIGLOT_URL", f"http://127.0.0.1:{httpd.server_address[1]}/")
        monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
        root, run = tmp_path / "data", tmp_path / "run"
        argv = ["train", "--dataset", "omniglot-lake", "--ways", "3", "--shots", "1",
                "--queries", "2", "--eval-queries", "2", "--data-root", str(root),
                "--download", "--run-dir", str(run), "--iterations", "2", "--meta-batch", "2",
                "--eval-episodes", "4", "--eval-batch", "2", "--eval-inner-steps", "1",
                "--report-steps", "0", "1", "--hidden", "4", "--strategy", "loop",
                "--quiet"]  # fmt: skip
        assert main(argv) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    for stem in ("images_background", "images_evaluation"):
        assert (root / "omniglot-py" / f"{stem}.zip").is_file()
    assert (run / "eval.json").is_file()


def test_list_presets_is_a_table(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["preset", "paper", "setting", "iterations"]
    row = next(line for line in out if line.startswith("maml-omniglot-20w1s"))
    assert "Finn et al. 2017" in row and "20-way 1-shot" in row and "60,000" in row


def test_compile_auto_falls_back_to_eager_when_the_step_does_not_compile(tmp_path, monkeypatch):
    from metafunc.harness import compiling
    from metafunc.step import CompileError

    real = compiling.compile_step

    def breaking(alg, opt, *, mode="default", **kw):
        step = real(alg, opt, mode=mode, **kw)
        if mode is None:
            return step

        def fails(*args, **kwargs):
            raise CompileError("compile_step(MAML, ...)(state, batch): a graph break (test)")

        return fails

    monkeypatch.setenv("METAFUNC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compiling, "COMPILE_GUESS_S", 0.0)
    monkeypatch.setattr(compiling, "compile_step", breaking)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), *QUICK]) == 0
    record = json.loads((run / "compile.json").read_text())
    assert record["choice"] == "off" and "does not compile" in record["why"]
    assert json.loads((run / "config.json").read_text())["compile"] == "off"
