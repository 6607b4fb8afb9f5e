"""The scripts in examples/ run as a reader runs them (``python examples/X.py --tiny``, in a fresh
process), print sane numbers, and use only metafunc's public API; the data-parallel loop gives
the same result on two ranks as in one process."""

from __future__ import annotations

import ast
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 300
NUMBER = r"(-?\d+\.\d+|nan|inf)"

# script -> lines its --tiny run must print, each with the numbers it checks
EXPECTED = {
    "new_algorithm.py": [
        rf"learned rates: fc0\.weight {NUMBER}",
        rf"query MSE before adaptation {NUMBER}, after adaptation {NUMBER}",
    ],
    "resnet_finetune.py": [
        r"loaded 62 tensors from resnet18\.safetensors",
        rf"query accuracy before fine-tuning {NUMBER}, after 1 step\(s\) {NUMBER}",
        rf"meta-iteration 0: query loss {NUMBER}, accuracy {NUMBER}",
    ],
    "own_training_loop.py": [
        r"ranks: 1, meta-parameters in sync",
        rf"query MSE before adaptation {NUMBER}, after 1 step {NUMBER}",
    ],
    "bilevel_digits.py": [
        rf"implicit +validation loss {NUMBER} -> {NUMBER}; corrupted examples hold",
        rf"unrolled +validation loss {NUMBER} -> {NUMBER};",
        rf"finite_difference +validation loss {NUMBER} -> {NUMBER};",
    ],
    "compiled_step.py": [
        rf"{NUMBER} ms per step eager \(mode=None\), {NUMBER} ms per step eager",
        rf"after 12 steps: query MSE {NUMBER} before adaptation, {NUMBER} after 1 step",
    ],
}


def _env(**extra: str) -> dict[str, str]:
    # the suite's thread count (conftest.py), and no process group inherited from a launcher
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    threads = os.environ.get("METAFUNC_TEST_THREADS", "1")
    return {**env, "OMP_NUM_THREADS": threads, **extra}


def run_tiny(name: str, **env: str) -> str:
    """``python examples/NAME --tiny``; its output, after checking it exited with 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tiny"],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{name} --tiny exited with {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_tiny_and_prints_finite_numbers(name: str) -> None:
    out = run_tiny(name)
    for pattern in EXPECTED[name]:
        match = re.search(pattern, out)
        assert match, f"{name} --tiny printed no line matching {pattern!r}:\n{out}"
        numbers = [float(x) for x in match.groups()]
        assert all(math.isfinite(x) for x in numbers), f"{name}: {match[0]!r}"
        if "accuracy" in pattern:
            assert all(0.0 <= x <= 1.0 for x in numbers[-1:]), f"{name}: {match[0]!r}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_has_a_docstring_and_uses_only_public_names(name: str) -> None:
    source = (EXAMPLES / name).read_text(encoding="utf-8")
    module = ast.parse(source)
    assert ast.get_docstring(module), f"{name} has no module docstring saying what it shows"
    private = set()
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("metafunc"):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            private |= {p for p in parts if p.startswith("_")}
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            private.add(node.attr)
    assert not private, f"{name} uses private names {sorted(private)}"
    assert len(source.splitlines()) <= 90, f"{name} is long for an example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_own_training_loop_on_two_ranks_matches_one_process() -> None:
    """Two processes given torchrun's variables (a static rendezvous, no agent) train on the
    tasks one process trains on, so rank 0 prints the one-process result."""
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, str(EXAMPLES / "own_training_loop.py"), "--tiny"]
    procs = [
        subprocess.Popen(
            cmd,
            env=_env(RANK=str(r), LOCAL_RANK=str(r), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    assert "ranks: 2, meta-parameters in sync" in outs[0]
    mse = re.compile(rf"query MSE before adaptation {NUMBER}, after 1 step {NUMBER}")
    two = mse.search(outs[0])
    one = mse.search(run_tiny("own_training_loop.py"))
    assert one and two
    for a, b in zip(one.groups(), two.groups(), strict=True):
        assert float(a) == pytest.approx(float(b), rel=1e-3)
