"""Pure models: shapes, initialisation, batch norm against torch, from_module under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafunc import TaskBatch, adapt, conv4, from_module, mlp, optim, resnet12, task_map, tree
from metafunc.models import batch_norm
from metafunc.strategies import exact_under_vmap


def count(params: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in params.values())


def test_mlp_is_the_sinusoid_network(gen):
    model = mlp()
    params = model.init(gen)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "fc0.weight": (40, 1),
        "fc0.bias": (40,),
        "fc1.weight": (40, 40),
        "fc1.bias": (40,),
        "head.weight": (1, 40),
        "head.bias": (1,),
    }
    assert float(params["fc1.weight"].std()) == pytest.approx(0.01, rel=0.2)
    assert float(params["fc1.bias"].abs().sum()) == 0
    assert model.apply(params, torch.zeros(7, 1)).shape == (7, 1)


def test_init_is_seeded_and_device_independent():
    a = conv4(5).init(torch.Generator().manual_seed(1))
    b = conv4(5).init(torch.Generator().manual_seed(1), dtype=torch.float64)
    c = conv4(5).init(torch.Generator().manual_seed(2))
    assert tree.allclose(tree.cast(a, torch.float64), b)
    assert not tree.allclose(a, c)


def test_conv4_omniglot_and_miniimagenet_shapes(gen):
    omni = conv4(5)
    params = omni.init(gen)
    expected = (1 * 64 * 9 + 64) + 3 * (64 * 64 * 9 + 64) + 4 * 128 + (64 * 5 + 5)
    assert count(params) == expected
    assert omni.apply(params, torch.randn(10, 1, 28, 28)).shape == (10, 5)
    assert omni.features is not None
    assert omni.features(params, torch.randn(10, 1, 28, 28)).shape == (10, 64)
    mini = conv4(5, in_channels=3, hidden=32, pooling="maxpool", image_size=84)
    params = mini.init(gen)
    assert params["head.weight"].shape == (5, 32 * 5 * 5)
    assert mini.apply(params, torch.randn(2, 3, 84, 84)).shape == (2, 5)
    embed = conv4(None, pooling="maxpool")
    assert "head.weight" not in embed.init(gen)
    assert embed.apply(embed.init(gen), torch.randn(3, 1, 28, 28)).shape == (3, 64)


def test_resnet12_shapes_and_size(gen):
    model = resnet12(5, channels=(8, 16, 24, 32))
    params = model.init(gen)
    assert model.apply(params, torch.randn(2, 3, 32, 32)).shape == (2, 5)
    full = resnet12(None).init(gen)
    # 12.4 M parameters: the standard few-shot ResNet-12 (64-160-320-640)
    assert 12_300_000 < count(full) < 12_500_000
    assert full["layer3.conv3.weight"].shape == (640, 640, 3, 3)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="conv4\\(pooling\\)"):
        conv4(pooling="avg")
    with pytest.raises(ValueError, match="conv4\\(image_size\\)"):
        conv4(pooling="maxpool", image_size=8)
    with pytest.raises(ValueError, match="mlp\\(sizes\\)"):
        mlp((1,))
    with pytest.raises(ValueError, match="expected \\[batch, 1, H, W\\]"):
        conv4().apply(conv4().init(), torch.zeros(1, 28, 28))
    for make in (conv4, resnet12):
        call, fix = f"{make.__name__}\\(kernels\\)", f"Pass {make.__name__}\\(kernels='cpu'\\)"
        with pytest.raises(ValueError, match=f"{call}: 'cuda' is not one of .*{fix}"):
            make(kernels="cuda")


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5), (6, 4, 3, 3)])
def test_batch_norm_matches_torch_in_train_and_eval(gen, shape):
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1
        ours, mean, var = batch_norm(x, bn.weight, bn.bias, mean, var, training=True)
        assert torch.allclose(ours, bn.train()(x), atol=1e-12)
    assert torch.allclose(mean, bn.running_mean) and torch.allclose(var, bn.running_var)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ours, _, _ = batch_norm(x, bn.weight, bn.bias, mean, var, training=False)
    assert torch.allclose(ours, bn.eval()(x), atol=1e-12)


def test_batch_norm_second_order_under_vmap_matches_per_task_loop(gen):
    """The BN path under vmap versus a per-task loop, through a second-order inner step."""

    def net(p, x):
        h = F.conv2d(x, p["w"], padding=1)
        h, _, _ = batch_norm(h, p["g"], p["b"])
        return F.linear(F.relu(h).mean(dim=(2, 3)), p["head"])

    params = {
        "w": torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64),
        "g": torch.rand(4, generator=gen, dtype=torch.float64) + 0.5,
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
        "head": torch.randn(2, 4, generator=gen, dtype=torch.float64),
    }
    x = torch.randn(3, 4, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1]).expand(3, 4)
    batch = TaskBatch(x, y, x.flip(1), y)

    def loss(p, x, y):
        return F.cross_entropy(net(p, x), y)

    inner = adapt(lambda p, t: loss(p, t.support_x, t.support_y), optim.sgd(0.5), 1)

    def task_loss(p, t):
        return loss(inner(p, t)[0], t.query_x, t.query_y)

    g = {
        s: torch.func.grad(lambda p, s=s: task_map(task_loss, strategy=s)(p, batch).mean())(params)
        for s in ("loop", "vmap")
    }
    err = tree.global_norm(tree.sub(g["vmap"], g["loop"])) / tree.global_norm(g["loop"])
    assert float(err) <= 1e-10


def test_model_state_running_statistics_follow_nn_batchnorm(gen):
    model = conv4(3, hidden=4)
    params = model.init(gen, dtype=torch.float64)
    state = model.init_state(dtype=torch.float64)
    x = torch.randn(5, 1, 28, 28, generator=gen, dtype=torch.float64)
    y_stateless = model.apply(params, x)
    y, new_state = model.apply(params, x, state=state)
    assert torch.allclose(y, y_stateless)
    assert set(new_state) == set(state) and not tree.allclose(new_state, state)
    # eval mode uses the running statistics: differs from batch statistics, state unchanged
    y_eval, same = model.apply(params, x, state=new_state, training=False)
    assert not torch.allclose(y_eval, y) and tree.allclose(same, new_state)


# ---------------------------------------------------------------------------------------------
# from_module
# ---------------------------------------------------------------------------------------------


def ref_meta_grad_module(module, params, batch, lr):
    """Per-task torch.autograd reference with the *original* module (nn.BatchNorm2d, no vmap)."""
    names = list(params)
    leaves = [params[k].detach().clone().requires_grad_() for k in names]
    total = 0.0
    for t in range(batch.support_x.shape[0]):
        fast = dict(zip(names, leaves, strict=True))
        out = torch.func.functional_call(module, fast, (batch.support_x[t],))
        grads = torch.autograd.grad(
            F.cross_entropy(out, batch.support_y[t]), list(fast.values()), create_graph=True
        )
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
        out = torch.func.functional_call(module, fast, (batch.query_x[t],))
        total = total + F.cross_entropy(out, batch.query_y[t])
    return dict(
        zip(names, torch.autograd.grad(total / batch.support_x.shape[0], leaves), strict=True)
    )


@pytest.mark.slow
def test_from_module_torchvision_resnet18_adapts_under_vmap(gen):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).double()
    model = from_module(net, head="fc")
    params = model.init()
    assert any("bn1" in k for k in params) and tree.allclose(params, dict(net.named_parameters()))
    x = torch.randn(2, 5, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.arange(5).expand(2, 5).clone()
    batch = TaskBatch(x, y, x + 0.1 * torch.randn(x.shape, generator=gen, dtype=x.dtype), y)

    def loss_fn(p, t):
        return F.cross_entropy(model.apply(p, t.support_x), t.support_y)

    inner = adapt(loss_fn, optim.sgd(0.1), 1)

    def task_loss(p, t):
        return F.cross_entropy(model.apply(inner(p, t)[0], t.query_x), t.query_y)

    grads = torch.func.grad(lambda p: task_map(task_loss, strategy="vmap")(p, batch).mean())(params)
    ref = ref_meta_grad_module(net.train(), params, batch, 0.1)
    err = tree.global_norm(tree.sub(grads, ref)) / tree.global_norm(ref)
    assert float(err) <= 1e-8


def test_from_module_state_matches_module_buffers(gen):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3),
        nn.LayerNorm(3),
    ).double()
    model = from_module(net)
    params, state = model.init(), model.init_state(dtype=torch.float64)
    assert set(state) == {"1.running_mean", "1.running_var"}
    x = torch.randn(6, 1, 6, 6, generator=gen, dtype=torch.float64)
    y, state = model.apply(params, x, state=state)
    assert torch.allclose(y, net.train()(x))  # the module updates its own buffers in place
    assert torch.allclose(state["1.running_mean"], net[1].running_mean)
    assert torch.allclose(state["1.running_var"], net[1].running_var)
    y_eval, _ = model.apply(params, x, state=state, training=False)
    assert torch.allclose(y_eval, net.eval()(x))
    assert torch.allclose(model.apply(params, x), net.train()(x))  # stateless: batch statistics


def test_from_module_init_with_generator_reinitialises_reproducibly():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = from_module(net)
    a = model.init(torch.Generator().manual_seed(5))
    b = model.init(torch.Generator().manual_seed(5))
    assert tree.allclose(a, b) and not tree.allclose(a, model.init())
    assert tree.allclose(model.init(), dict(net.named_parameters()))


def test_from_module_refusals():
    with pytest.raises(TypeError, match=r"from_module\(module\): 0 is a InstanceNorm2d"):
        from_module(nn.Sequential(nn.InstanceNorm2d(3, affine=True)))
    with pytest.raises(ValueError, match=r"convert_norms=False\): 1 is a BatchNorm2d"):
        from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), convert_norms=False)
    with pytest.raises(ValueError, match="momentum=None"):
        from_module(nn.Sequential(nn.BatchNorm1d(2, momentum=None)))
    with pytest.raises(ValueError, match="no parameter starts with 'classifier.'"):
        from_module(nn.Sequential(nn.Linear(2, 2)), head="classifier")
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        from_module(lambda x: x)  # type: ignore[arg-type]

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    with pytest.raises(TypeError, match="subclass of LayerNorm"):
        from_module(nn.Sequential(LayerNorm2d(3)))


@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_from_module_norms_exact_under_vmap(gen, norm):
    """Every norm from_module lets through is exact for second order under vmap."""
    layer = {
        "batch": nn.BatchNorm2d(4),
        "layer": nn.LayerNorm([4, 4, 4]),
        "group": nn.GroupNorm(2, 4),
    }[norm]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), layer, nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    model = from_module(net.double())

    x = torch.randn(3, 6, 1, 6, 6, generator=gen, dtype=torch.float64)
    errors = second_order_vmap_errors(model, model.init(), x, ("vmap", "chunked"))
    assert max(errors.values()) <= 1e-10


def second_order_vmap_errors(model, params, x, strategies):
    """``check_strategies`` of a 2-step second-order MAML task loss on 3 tasks of 6 images
    ``x: [3, 6, ...]`` (query: the support reversed) against the per-task loop."""
    from metafunc import check_strategies

    y = torch.arange(3).repeat(2).expand(3, 6).clone()
    batch = TaskBatch(x, y, x.flip(1), y)

    def loss_fn(p, t):
        return F.cross_entropy(model.apply(p, t.support_x), t.support_y)

    inner = adapt(loss_fn, optim.sgd(0.3), 2)

    def task_loss(p, t):
        return F.cross_entropy(model.apply(inner(p, t)[0], t.query_x), t.query_y)

    return check_strategies(
        task_loss, params, batch, strategies=strategies, chunk_size=2, rtol=1e-10
    )


def test_a_models_inference_twin_is_made_once():
    model = conv4(3, hidden=4)
    assert model.inference() is model.inference()
    assert model.inference().apply.keywords == {"training": False}


def test_exact_under_vmap_refuses_torch_norms_and_random_draws(gen):
    """``F.batch_norm`` / ``F.layer_norm`` called directly (wrong second-order gradients under
    vmap on this torch) or ``nn.Dropout`` (a draw vmap cannot split into the loop's per-task
    streams) make a function inexact; from_module's converted norms and plain layers are exact,
    and a function that fails is reported inexact."""
    x = torch.randn(2, 4, 5, generator=gen)
    w = torch.ones(5)
    assert not exact_under_vmap(lambda p, t: F.layer_norm(t, (5,), p), w, x)
    assert not exact_under_vmap(lambda p, t: F.batch_norm(t, None, None, p, training=True), w, x)
    assert exact_under_vmap(lambda p, t: t * p, w, x)
    for layer, exact in ((torch.nn.BatchNorm1d(5), True), (torch.nn.LayerNorm(5), True),
                         (torch.nn.Dropout(0.5), False)):  # fmt: skip
        model = from_module(torch.nn.Sequential(torch.nn.Linear(5, 5), layer))
        assert exact_under_vmap(model.apply, model.init(), x) == exact, layer
    assert not exact_under_vmap(lambda p, t: p @ t, torch.ones(7), x)  # fails: False


@pytest.mark.parametrize(
    "name", ["conv4-stride", "conv4-maxpool", "conv4-cpu-kernels", "resnet12", "mlp"]
)
def test_native_models_are_exact_under_vmap(gen, name):
    """What ``exact_under_vmap`` finds for metafunc's own models (MAML then batches their
    tasks' shared first step under vmap on the 'threads' strategy) holds: a second-order inner
    loop's gradient under vmap equals the per-task loop's, in float64."""

    model, x = {
        "conv4-stride": (conv4(3, hidden=6), torch.randn(3, 6, 1, 28, 28, generator=gen)),
        "conv4-cpu-kernels": (
            conv4(3, hidden=6, kernels="cpu"),
            torch.randn(3, 6, 1, 28, 28, generator=gen),
        ),
        "conv4-maxpool": (
            conv4(3, in_channels=3, hidden=6, pooling="maxpool", image_size=32),
            torch.randn(3, 6, 3, 32, 32, generator=gen),
        ),
        "resnet12": (
            resnet12(3, channels=(4, 6, 8, 10)),
            torch.randn(3, 6, 3, 16, 16, generator=gen),
        ),
        "mlp": (mlp((5, 8, 3)), torch.randn(3, 6, 5, generator=gen)),
    }[name]
    params = model.init(gen, dtype=torch.float64)
    assert exact_under_vmap(model.apply, params, x[:2].double())
    errors = second_order_vmap_errors(model, params, x.double(), ("vmap",))
    assert max(errors.values()) <= 1e-10
