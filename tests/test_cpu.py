"""metafunc.cpu: glibc malloc settings for many small per-task graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import metafunc
from metafunc import cpu

GLIBC = cpu._glibc()

# One Omniglot-sized MAML meta-batch in a loop; prints the minor page faults per meta-batch.
_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    import metafunc
    from metafunc.algorithms import MAML
    from metafunc.data import TaskBatch
    if sys.argv[1] == "tuned":
        assert metafunc.tune_cpu_allocator()
    model = metafunc.conv4(5)
    params = model.init(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(
        torch.randn(2, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(2, 1),
        torch.randn(2, 75, 1, 28, 28, generator=g),
        torch.arange(5).repeat_interleave(15).repeat(2, 1),
    )
    alg = MAML(model, inner_lr=0.4, inner_steps=1, strategy="loop")
    alg.meta_grad({"params": params}, batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        alg.meta_grad({"params": params}, batch)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
    """
)


def _faults(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_tuned_allocator_stops_refaulting_memory_every_meta_batch() -> None:
    default, tuned = _faults("default"), _faults("tuned")
    # Measured: about 9,000-12,000 faults per meta-batch by default, a few hundred tuned.
    assert default > 2000, default
    assert tuned < default / 5, (tuned, default)


@pytest.mark.skipif(not GLIBC, reason="glibc malloc only")
def test_applies_and_can_be_called_again() -> None:
    assert metafunc.tune_cpu_allocator() is True
    assert metafunc.tune_cpu_allocator(trim_threshold=256 << 20) is True
    assert metafunc.tune_cpu_allocator() is True  # back to the defaults


@pytest.mark.parametrize("name", sorted(cpu.MALLOC_ENV))
def test_environment_settings_win(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1048576")
    assert metafunc.tune_cpu_allocator() is False


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_glibc", lambda: False)
    assert metafunc.tune_cpu_allocator() is False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trim_threshold": -1}, r"tune_cpu_allocator\(trim_threshold\): must be an int"),
        ({"top_pad": 1.5}, r"tune_cpu_allocator\(top_pad\): must be an int"),
        ({"top_pad": True}, r"tune_cpu_allocator\(top_pad\): must be an int"),
        ({"trim_threshold": 1 << 31}, r"\[0, 2\*\*31\)"),
        ({"mmap_threshold": (32 << 20) + 1}, r"mmap_threshold\): .* glibc's maximum"),
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metafunc.tune_cpu_allocator(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("command", "tuned"), [("eval", True), ("plot", False)])
def test_cli_tunes_for_train_and_eval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object, command: str, tuned: bool
) -> None:
    from metafunc import cli

    calls: list[int] = []
    monkeypatch.setattr(cpu, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert cli.main([command, str(tmp_path) + "/missing"]) == 2  # no run folder there
    assert calls == ([1] if tuned else [])
