"""``precision``: bf16 autocast around the meta-gradient and evaluation (its error against
float64 is what ``benchmarks/bench_precision.py`` measures), TF32 flags, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from metafunc import tree
from metafunc.cli import main
from metafunc.harness import Config, ConfigError
from metafunc.harness.run import build, init_meta


def test_bf16_autocasts_the_meta_gradient_and_stays_near_float32():
    cfg = Config(meta_batch=4, inner_steps=1, precision="bf16")
    run, ref_run = build(cfg), build(cfg.replace(precision="default"))
    meta = init_meta(run, 0)
    batch = run.train_tasks.sample(4, torch.Generator().manual_seed(0))
    seen = []
    original = run.algorithm.model.apply

    def spy(params, x, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(params, x, *args, **kwargs)

    object.__setattr__(run.algorithm.model, "apply", spy)
    grads, loss, _ = run.meta_grad(meta, batch)
    assert seen and all(seen)  # every forward ran under autocast
    ref, ref_loss, _ = ref_run.meta_grad(meta, batch)
    assert all(g.dtype == torch.float32 for g in tree.leaves(grads))
    cos = tree.vdot(grads, ref) / (tree.global_norm(grads) * tree.global_norm(ref))
    assert float(cos) > 0.95  # the 1-40-40-1 MLP; conv4 on Omniglot: see bench_precision
    assert float(loss) == pytest.approx(float(ref_loss), rel=0.05)
    assert not torch.is_autocast_enabled("cpu")


def test_training_in_bf16_follows_the_float32_run(tmp_path):
    evals = {}
    for precision in ("default", "bf16"):
        run = tmp_path / precision
        argv = ["train", "--run-dir", str(run), "--precision", precision, "--iterations", "300",
                "--eval-episodes", "50", "--quiet", "--log-every", "100"]  # fmt: skip
        assert main(argv) == 0
        evals[precision] = json.loads((run / "eval.json").read_text())["loss"]
    for steps in ("0", "1", "10"):
        bf16, full = evals["bf16"][steps]["mean"], evals["default"][steps]["mean"]
        assert bf16 == pytest.approx(full, rel=0.02)
        assert bf16 != full  # autocast did change the arithmetic


def test_precision_refusals():
    with pytest.raises(ConfigError, match="precision='fp8' is not one of"):
        Config(precision="fp8")
    with pytest.raises(ConfigError, match="'tf32' is a CUDA setting"):
        Config(precision="tf32")
    with pytest.raises(ConfigError, match="use dtype float32"):
        Config(precision="bf16", dtype="float64")


@pytest.mark.gpu
def test_tf32_sets_the_cuda_flags():
    build(Config(precision="tf32", device="cuda", meta_batch=2))
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    build(Config(precision="ieee", device="cuda", meta_batch=2))
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"


def test_kernels_config_picks_the_models_kernels():
    """``kernels``: ``cpu`` builds the models with metafunc.kernels, ``reference`` without, and
    ``auto`` (the default) the one for the run's device; the MLP has nothing to choose."""
    from metafunc.harness.run import build_model

    for dataset, model in (
        ("omniglot", "auto"),
        ("mini-imagenet", "auto"),
        ("omniglot", "resnet12"),
    ):
        cfg = Config(dataset=dataset, model=model, shots=1)
        for kernels, device, cpu in (
            ("cpu", "cpu", True),
            ("reference", "cpu", False),
            ("auto", "cpu", True),
            ("auto", "cuda", False),
        ):
            name = build_model(cfg.replace(kernels=kernels, device=device), 5).name
            assert name.endswith("-cpu-kernels") == cpu, (dataset, model, kernels, device)
    for kernels in ("cpu", "reference"):
        with pytest.raises(ConfigError, match="kernels is for the convolutional models"):
            build_model(Config(kernels=kernels), None)
    with pytest.raises(ConfigError, match="kernels='cuda' is not one of auto, reference, cpu"):
        Config(kernels="cuda")


def test_configs_saved_with_channels_last_still_load():
    """Run folders written before the ``kernels`` key hold ``channels_last`` (None: channels-last
    on the CPU, True: everywhere, False: never); they load as ``auto`` and, for False,
    ``reference``."""
    saved = {k: v for k, v in Config(dataset="omniglot").to_dict().items() if k != "kernels"}
    for old, kernels in ((None, "auto"), (True, "auto"), (False, "reference")):
        cfg = Config.from_dict({**saved, "channels_last": old}, source="run/config.json")
        assert cfg.replace(kernels="auto") == Config(dataset="omniglot")
        assert cfg.kernels == kernels
    with pytest.raises(ConfigError, match="channels_last is the older form of kernels"):
        Config.from_dict({"channels_last": False, "kernels": "cpu"})
