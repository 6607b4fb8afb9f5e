"""The pretrain-then-fine-tune baseline: fine-tuning the head or everything, the prototype head,
pre-training (conv4, ResNet backbones, regression), pre-training batches and loading weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import class_tasks, sine_tasks
from torch import nn

from metafunc import TaskBatch, conv4, from_module, mlp, optim, resnet12, tree
from metafunc.algorithms import Baseline, pretrain_batch, prototype_logits


def blob_backbone():
    """A small feature extractor through from_module: 16 inputs -> 32 tanh features."""
    return from_module(nn.Sequential(nn.Linear(16, 32), nn.Tanh()))


def blob_tasks(gen, tasks=4, ways=5, shots=5, queries=10, spread=0.3):
    """Linearly separable tasks: each class a Gaussian blob around its own random centre."""
    centres = torch.randn(tasks, ways, 1, 16, generator=gen)

    def split(n):
        x = centres + spread * torch.randn(tasks, ways, n, 16, generator=gen)
        return x.flatten(1, 2), torch.arange(ways).repeat_interleave(n).expand(tasks, -1)

    return TaskBatch(*split(shots), *split(queries))


@pytest.mark.parametrize("finetune", ["head", "all"])
def test_baseline_finetuning_reaches_high_accuracy(gen, finetune):
    alg = Baseline(
        blob_backbone(), shots=5, finetune=finetune, inner_lr=0.05, inner_steps=30, strategy="vmap"
    )
    meta = alg.init(gen)
    batch = blob_tasks(gen, spread=0.6)
    query = alg.evaluate(meta, batch, steps=30)
    support = alg.evaluate(meta, TaskBatch(*batch[:2], *batch[:2]), steps=30)["loss"].mean(0)
    acc = query["accuracy"].mean(0)
    assert query["accuracy"].shape == (4, 31)
    assert float(acc[0]) <= 0.25  # a zero head: chance
    assert float(acc[-1]) >= 0.95
    assert float(support[-1]) < 0.05 * float(support[0])


def test_baseline_head_finetuning_leaves_backbone_unchanged(gen):
    batch = blob_tasks(gen, tasks=3)
    head = Baseline(blob_backbone(), shots=5, finetune="head", inner_lr=0.05, inner_steps=20)
    meta = head.init(gen)
    adapted = head.adapted_params(meta, batch)
    for k, v in meta["params"].items():
        assert torch.equal(adapted["params"][k], v.expand_as(adapted["params"][k]))
    # the predictions use that backbone and the adapted head
    feats = head.model.apply(meta["params"], batch.query_x.flatten(0, 1)).view(3, -1, 32)
    logits = feats @ adapted["head"]["weight"].transpose(1, 2) + adapted["head"]["bias"][:, None]
    assert torch.allclose(head.adapt_and_predict(meta, batch, 20)[:, -1], logits, atol=1e-6)
    full = Baseline(blob_backbone(), shots=5, finetune="all", inner_lr=0.05, inner_steps=20)
    moved = full.adapted_params(meta, batch)["params"]
    assert float((moved["0.weight"] - meta["params"]["0.weight"]).abs().max()) > 1e-3


def test_baseline_prototype_head_is_the_prototype_classifier(gen):
    batch = blob_tasks(gen, tasks=2)
    alg = Baseline(blob_backbone(), shots=5, head_init="prototypes")
    meta = alg.init(gen)
    first = alg.adapt_and_predict(meta, batch, steps=0)[:, 0]
    emb = alg.model.apply(meta["params"], batch.support_x.flatten(0, 1)).view(2, 25, 32)
    qemb = alg.model.apply(meta["params"], batch.query_x.flatten(0, 1)).view(2, 50, 32)
    ref = torch.stack([prototype_logits(emb[t], batch.support_y[t], qemb[t], 5) for t in range(2)])
    assert torch.allclose(first.log_softmax(-1), ref.log_softmax(-1), atol=1e-4)


def test_baseline_pretraining_loss_decreases(gen):
    images = torch.randn(10, 1, 1, 14, 14, generator=gen) + 0.3 * torch.randn(
        10, 20, 1, 14, 14, generator=gen
    )  # [classes, examples, C, H, W]
    alg = Baseline(
        conv4(None, hidden=8, image_size=14), num_train_classes=10, feature_dim=8, shots=1
    )
    meta = alg.init(gen)
    assert meta["classifier"]["weight"].shape == (10, 8)
    opt = alg.outer_optimizer(1e-2, 40)
    state = opt.init(meta)
    losses = []
    for _ in range(40):
        x, y = pretrain_batch(images, 32, gen)
        grads, loss, _ = alg.pretrain_grad(meta, x, y)
        updates, state = opt.update(grads, state, meta)
        meta = optim.apply_updates(meta, updates)
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="pretrain_loss"):
        alg.meta_loss(meta, class_tasks(gen, 1, 2, 1, 1, size=14, dtype=torch.float32))


def _torchvision_resnet18_backbone():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    net.fc = nn.Identity()
    return from_module(net)


@pytest.mark.parametrize(
    ("backbone", "dim"),
    [(lambda: resnet12(None, channels=(8, 8, 16, 16)), 16), (_torchvision_resnet18_backbone, 512)],
    ids=["resnet12", "torchvision-resnet18"],
)
def test_baseline_pretrains_and_finetunes_resnet_backbones(gen, backbone, dim):
    alg = Baseline(backbone(), num_train_classes=6, feature_dim=dim, shots=1, inner_steps=3)
    meta = alg.init(gen, dtype=torch.float64)
    x = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    grads, loss, _ = alg.pretrain_grad(meta, x, torch.arange(8) % 6)
    assert torch.isfinite(loss) and set(grads) == {"params", "classifier"}
    assert float(tree.global_norm(grads["params"])) > 0
    batch = class_tasks(gen, 2, 3, 1, 2, size=32)
    batch = TaskBatch(*(t.expand(-1, -1, 3, -1, -1) if t.dim() == 5 else t for t in batch))
    per_strategy = []
    for strategy in ("vmap", "loop"):
        tuned = Baseline(
            alg.model, num_train_classes=6, feature_dim=dim, shots=1, inner_steps=3,
            strategy=strategy,
        )  # fmt: skip
        per_strategy.append(tuned.adapt_and_predict(meta, batch, steps=3))
    assert per_strategy[0].shape == (2, 4, 6, 3)
    assert torch.allclose(per_strategy[0], per_strategy[1], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(per_strategy[0][:, 0], per_strategy[0][:, -1])  # the head trained


def test_pretrain_batch_labels_and_determinism():
    images = torch.arange(6 * 4, dtype=torch.float32).view(6, 4, 1, 1, 1)
    x, y = pretrain_batch(images, 10, torch.Generator().manual_seed(3))
    x2, y2 = pretrain_batch(images, 10, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert y.dtype == torch.int64 and torch.equal(y, (x.flatten() // 4).long())
    assert x.flatten().unique().numel() == 10  # distinct examples


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_baseline_loads_pretrained_weights(gen, tmp_path, fmt):
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh())
    torch.nn.init.normal_(net[0].weight, generator=gen)
    state = {**net.state_dict(), "fc.weight": torch.zeros(3, 3)}  # extra entries are ignored
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    alg = Baseline(from_module(nn.Sequential(nn.Linear(16, 32), nn.Tanh())), shots=5)
    meta = alg.init(gen, weights=path)
    assert torch.equal(meta["params"]["0.weight"], net[0].weight.detach())
    bad = Baseline(blob_backbone(), shots=5)
    torch.save({"0.weight": torch.zeros(32, 16)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"no entry for \['0.bias'\]"):
        bad.init(gen, weights=tmp_path / "partial.pt")


def test_baseline_regression_pretrains_on_all_points_and_finetunes_everything(gen):
    alg = Baseline(mlp((1, 8, 1), init="xavier"), loss="mse", inner_lr=0.01, inner_steps=5)
    assert (alg.finetune, alg.inner_optimizer) == ("all", "sgd")
    meta = alg.init(gen, dtype=torch.float64)
    batch = sine_tasks(gen, 3, dtype=torch.float64)
    loss, _ = alg.meta_loss(meta, batch)
    ref = (
        sum(
            F.mse_loss(
                ref_mlp_relu(meta["params"], torch.cat([batch.support_x[t], batch.query_x[t]])),
                torch.cat([batch.support_y[t], batch.query_y[t]]),
            )
            for t in range(3)
        )
        / 3
    )
    assert abs(float(loss - ref)) <= 1e-12
    moved = alg.adapted_params(meta, batch)["params"]
    assert float((moved["fc0.weight"][0] - meta["params"]["fc0.weight"]).abs().max()) > 0
    support = alg.evaluate(meta, TaskBatch(*batch[:2], *batch[:2]), steps=5)["loss"].mean(0)
    assert float(support[-1]) < float(support[0])


def ref_mlp_relu(p, x):
    return torch.relu(x @ p["fc0.weight"].T + p["fc0.bias"]) @ p["head.weight"].T + p["head.bias"]
