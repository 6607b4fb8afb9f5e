"""Data-parallel training on torch.distributed (gloo, CPU): 2 ranks reach the meta-parameters of
1 process on the same tasks (even and uneven splits), a killed worker restarts under torchrun
and resumes to the uninterrupted result, bad set-ups fail clearly, and the library helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import IO

import pytest
import torch
from safetensors.torch import load_file

import metafunc.distributed as mfd
from metafunc.cli import main
from metafunc.data import TaskBatch
from metafunc.harness import Config, ConfigError, latest_checkpoint, launch

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

# MAML on the sinusoid in float64: 5 meta-steps, checkpoints after steps 2, 4 and 5.
TINY = [
    "--dtype", "float64", "--iterations", "5", "--strategy", "loop", "--eval-episodes", "6",
    "--eval-batch", "2", "--eval-inner-steps", "1", "--report-steps", "0", "1",
    "--checkpoint-every", "2", "--log-every", "1",
]  # fmt: skip
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _wait(procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]]) -> list[tuple[int, str]]:
    """Return codes and combined output; on a hang, kill the process groups and fail."""
    out = []
    try:
        for p, log in procs:
            p.wait(timeout=TIMEOUT)
            log.seek(0)
            out.append((p.returncode, log.read().decode(errors="replace")))
            log.close()
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"distributed run did not finish within {TIMEOUT} s")
    return out


def _popen(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Start ``cmd`` in its own process group, its output going to a file (never a full pipe)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed by _wait)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, log


def torchrun(args: list[str], *, max_restarts: int = 0, **env: str) -> tuple[int, str]:
    """``torchrun --nproc-per-node 2 -m metafunc train ARGS`` with c10d rendezvous on 127.0.0.1."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "--max-restarts", str(max_restarts), "-m", "metafunc", "train", *args,
    ]  # fmt: skip
    return _wait([_popen(cmd, _env(**env))])[0]


def two_ranks(per_rank: list[list[str]], **env: str) -> list[tuple[int, str]]:
    """Two processes given the variables torchrun gives its workers (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT: a static rendezvous, as on two nodes), each running
    ``python ARGS`` with its own arguments. Quicker than torchrun: no agent process."""
    port = str(_free_port())
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env}
    procs = [
        _popen([sys.executable, *args], _env(RANK=str(r), LOCAL_RANK=str(r), **common))
        for r, args in enumerate(per_rank)
    ]
    return _wait(procs)


def train_two_ranks(args: list[str], **env: str) -> None:
    results = two_ranks([["-m", "metafunc", "train", *args]] * 2, **env)
    for code, out in results:
        assert code == 0, out


def final_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "ckpt-00000005.safetensors"
    return load_file(str(ckpt))


def assert_close_meta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    meta = sorted(k for k in a if k.startswith("meta/"))
    assert meta and meta == sorted(k for k in b if k.startswith("meta/"))
    for k in meta:
        rel = float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-300))
        assert rel <= 1e-10, f"{k}: relative difference {rel:.2e}"


def losses(run: Path) -> torch.Tensor:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One-process runs with meta-batch 8 and 7, the references."""
    out = {}
    for mb in (8, 7):
        run = tmp_path_factory.mktemp("single") / f"mb{mb}"
        argv = ["train", "--run-dir", str(run), *TINY, "--meta-batch", str(mb), "--quiet"]
        assert main(argv) == 0
        out[mb] = run
    return out


@pytest.fixture(scope="module")
def pair8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, global meta-batch 8, parameters compared across ranks after every step."""
    run = tmp_path_factory.mktemp("pair") / "mb8"
    args = ["--run-dir", str(run), *TINY, "--meta-batch", "8", "--quiet"]
    train_two_ranks(args, METAFUNC_DEBUG_SYNC="1")
    return run


@pytest.mark.slow
@pytest.mark.parametrize("meta_batch", [8, 7])
def test_two_ranks_match_one_process_on_the_same_tasks(tmp_path, single, pair8, meta_batch):
    if meta_batch == 8:
        run = pair8
    else:  # uneven: rank 0 adapts 4 tasks, rank 1 adapts 3
        run = tmp_path / "mb7"
        args = ["--run-dir", str(run), *TINY, "--meta-batch", "7", "--quiet"]
        train_two_ranks(args, METAFUNC_DEBUG_SYNC="2")
    ref = single[meta_batch]
    a, b = final_state(ref), final_state(run)
    assert_close_meta(a, b)
    other = final_state(single[15 - meta_batch])
    assert not torch.equal(a["meta/params.head.weight"], other["meta/params.head.weight"])
    torch.testing.assert_close(losses(run), losses(ref), rtol=1e-10, atol=0)
    ev_a, ev_b = (json.loads((r / "eval.json").read_text()) for r in (ref, run))
    assert ev_b["episodes"] == 6  # 3 batches of 2, dealt to 2 ranks and gathered
    for s in ("0", "1"):
        assert ev_b["loss"][s]["mean"] == pytest.approx(ev_a["loss"][s]["mean"], rel=1e-10)
    assert json.loads((run / "config.json").read_text())["meta_batch"] == meta_batch


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_to_the_uninterrupted_result(tmp_path, pair8):
    run = tmp_path / "killed"
    # rank 1 SIGKILLs itself before step 3 of the first attempt; rank 0 has saved step 2 by then
    code, out = torchrun(
        ["--run-dir", str(run), *TINY, "--meta-batch", "8"],
        max_restarts=1,
        METAFUNC_TEST_CRASH="1:3",
    )
    assert code == 0, out
    assert "exitcode: -9" in out and "resuming" in out and "from ckpt-00000002" in out, out
    a, b = final_state(pair8), final_state(run)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, optimizer and RNG included
    losses(run)  # one record per step: the first attempt's step 3 was dropped on resume


@pytest.mark.slow
def test_meta_batch_smaller_than_world_size(tmp_path):
    argv = ["-m", "metafunc", "train", "--run-dir", str(tmp_path / "r"), *TINY, "--quiet"]
    results = two_ranks([[*argv, "--meta-batch", "1"]] * 2)
    for code, out in results:
        assert code == 2, out
        assert "meta_batch=1 is smaller than the world size (2)" in out, out
        assert "--meta-batch 2 or more" in out and "Traceback" not in out
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_mismatched_configs_across_ranks(tmp_path):
    argv = ["-m", "metafunc", "train", "--run-dir", str(tmp_path / "r"), *TINY, "--quiet"]
    results = two_ranks(
        [[*argv, "--meta-batch", "8"], [*argv, "--meta-batch", "4", "--inner-lr", "0.02"]]
    )
    for code, out in results:
        assert code == 2, out
        assert "the configuration differs across ranks: rank 1 has" in out, out
        assert "inner_lr=0.02 (rank 0: 0.01), meta_batch=4 (rank 0: 8)" in out, out


def test_a_restarted_group_resumes_only_its_own_config(single):
    """What a restarted worker group reads in its run folder (rank 0, ``auto=True``)."""
    run = single[8]
    saved = Config.from_dict(json.loads((run / "config.json").read_text()))
    assert saved.strategy == "loop" and saved.meta_batch == 8
    same = saved.replace(strategy="auto")  # 'auto' was resolved and saved: still this run
    cfg, ckpt, _ = launch.open_run(same, run, resume=False, auto=True)
    assert cfg == saved and ckpt == latest_checkpoint(run)
    assert launch.open_run(same, run, resume=False, auto=False)[1] is None  # one process
    with pytest.raises(ConfigError, match=r"holds checkpoints of another configuration \(it "
                       r"differs in inner_lr, meta_batch\)"):  # fmt: skip
        launch.open_run(saved.replace(meta_batch=4, inner_lr=0.5), run, resume=False, auto=True)


def test_a_restarted_group_resumes_a_run_whose_auto_strategy_chose_chunks(tmp_path):
    """'auto' on CUDA may resolve to ``chunked`` with a chunk size: both were chosen, not given."""
    saved = Config(strategy="chunked", chunk_size=4, meta_batch=8)
    (tmp_path / "config.json").write_text(json.dumps(saved.to_dict()))
    (tmp_path / "ckpt-00000002.safetensors").write_bytes(b"")
    cfg, ckpt, _ = launch.open_run(saved.replace(strategy="auto", chunk_size=None), tmp_path,
                                   resume=False, auto=True)  # fmt: skip
    assert cfg == saved and ckpt is not None
    with pytest.raises(ConfigError, match=r"differs in chunk_size"):
        launch.open_run(saved.replace(chunk_size=2), tmp_path, resume=False, auto=True)


LIBRARY = """
import torch
import metafunc.distributed as mfd
from metafunc.data import TaskBatch

ctx = mfd.init_from_env()
r = ctx.rank
assert (ctx.world_size, mfd.rank(), mfd.world_size(), ctx.owns_group) == (2, r, 2, True)

# Uneven shares (4 and 3 of 7 tasks), weighted by task count: the mean over all 7 tasks.
x = torch.linspace(0.5, 3.0, 7 * 5, dtype=torch.float64).reshape(7, 5) ** 1.5
batch = TaskBatch(x[:, :2], x[:, 2:3], x[:, 3:], x[:, 4:])
local = mfd.split_batch(batch)
assert local.num_tasks == (4, 3)[r]
tree = {"a": local.support_x.mean(0), "b": [local.query_x.mean(0).float()]}
mean = mfd.all_reduce_mean(tree, weight=local.num_tasks, bucket_bytes=16)  # several buckets
torch.testing.assert_close(mean["a"], x[:, :2].mean(0), rtol=1e-15, atol=0)
torch.testing.assert_close(mean["b"][0], x[:, 3:].mean(0).float())
assert mean["b"][0].dtype == torch.float32

got = mfd.broadcast_tree({"p": torch.full((3,), float(r)), "n": torch.tensor([r + 5])})
assert got["p"].eq(0).all() and int(got["n"]) == 5
assert mfd.broadcast_object({"rank": r}) == {"rank": 0}
assert mfd.all_gather_object(r * 10) == [0, 10]

mfd.assert_in_sync({"p": torch.ones(3, dtype=torch.float64)})
try:
    mfd.assert_in_sync({"p": torch.ones(3, dtype=torch.float64) * (1 + r * 2.0**-52)}, what="p")
    raise SystemExit("assert_in_sync missed a one-ulp difference")
except RuntimeError as err:
    assert "p differ across ranks: rank(s) 1 do not match rank 0" in str(err), err
try:
    mfd.assert_same({"lr": 0.1, "seed": r})
    raise SystemExit("assert_same missed a different seed")
except ValueError as err:
    assert "rank 1 has seed=1 (rank 0: 0)" in str(err), err
mfd.shutdown(ctx)
assert not mfd.is_initialized()
mfd.shutdown(ctx)  # a second call does nothing
print("library ok")
"""


@pytest.mark.slow
def test_library_helpers_across_two_ranks(tmp_path):
    script = tmp_path / "library.py"
    script.write_text(textwrap.dedent(LIBRARY))
    for code, out in two_ranks([[str(script)]] * 2):
        assert code == 0 and "library ok" in out, out


# -- one process: no process group -------------------------------------------------------------


def test_split_sizes_and_slices():
    assert mfd.split_sizes(8, 2) == [4, 4]
    assert mfd.split_sizes(7, 3) == [3, 2, 2]
    slices = [mfd.local_slice(7, r, 3) for r in range(3)]
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 5), (5, 7)]
    assert mfd.local_slice(5) == slice(0, 5)  # no process group: everything is local
    with pytest.raises(ValueError, match=r"cannot give each of 4 ranks one"):
        mfd.split_sizes(3, 4)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\)"):
        mfd.local_slice(4, 2, 2)


def test_split_batch_slices_every_field():
    x = torch.arange(5 * 3, dtype=torch.float64).reshape(5, 3)
    batch = TaskBatch(x, x.long(), x + 1, x.long() + 1)
    part = mfd.split_batch(batch, 1, 2)
    assert isinstance(part, TaskBatch) and part.num_tasks == 2
    assert torch.equal(part.support_x, x[3:]) and torch.equal(part.query_y, x.long()[3:] + 1)
    with pytest.raises(ValueError, match="same leading"):
        mfd.split_batch({"a": torch.zeros(4), "b": torch.zeros(3)}, 0, 2)


def test_collectives_without_a_group_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert mfd.init_from_env() is None and (mfd.rank(), mfd.world_size()) == (0, 1)
    tree = {"w": torch.randn(3, generator=torch.Generator().manual_seed(0))}
    assert mfd.all_reduce_mean(tree, weight=3) is tree
    assert mfd.broadcast_tree(tree) is tree
    assert mfd.all_gather_object(1) == [1]
    mfd.assert_in_sync(tree)
    mfd.assert_same({"a": 1})
    with pytest.raises(TypeError, match=r"leaf 'n' is torch.int64; only floating"):
        mfd.all_reduce_mean({"n": torch.tensor(1)}, weight=1)
    with pytest.raises(ValueError, match="weight"):
        mfd.all_reduce_mean(tree, weight=-1)


def test_tree_digest_sees_one_ulp_and_the_structure():
    a = {"w": torch.ones(3, dtype=torch.float64)}
    assert mfd.tree_digest(a) == mfd.tree_digest({"w": torch.ones(3, dtype=torch.float64)})
    assert mfd.tree_digest(a) != mfd.tree_digest({"w": a["w"] * (1 + 2.0**-52)})
    assert mfd.tree_digest(a) != mfd.tree_digest({"v": a["w"]})
    assert mfd.tree_digest(a) != mfd.tree_digest({"w": a["w"].float()})


def test_metafunc_distributed_is_a_lazy_attribute():
    import metafunc

    assert "distributed" in metafunc.__all__ and metafunc.distributed is mfd
