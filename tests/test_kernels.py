"""metafunc.kernels against the reference layers: layouts, three orders of gradients in float64,
float32 accuracy, and the models' ``kernels`` option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metafunc import TaskBatch, adapt, conv4, kernels, optim, resnet12, tree
from metafunc.inner import grad_with_aux
from metafunc.models import batch_norm

CL = torch.channels_last


def graph_nodes(tensors) -> set[str]:
    """The class names of every autograd node behind ``tensors``."""
    nodes, seen = [t.grad_fn for t in tensors], set()
    while nodes:
        node = nodes.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.extend(f for f, _ in node.next_functions)
    return {type(f).__name__ for f in seen}


# ---------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------


def test_conv2d_is_channels_last_for_large_cpu_passes_outside_transforms(gen):
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    big = torch.randn(8, 3, 24, 24, generator=gen, dtype=torch.float64)
    small = big[:2]
    assert 2 * 24 * 24 < kernels.CHANNELS_LAST_MIN_PIXELS <= 8 * 24 * 24
    for x, last in ((big, True), (small, False), (small.contiguous(memory_format=CL), True)):
        y = kernels.conv2d(x, w, b, 2, 1)
        assert torch.allclose(y, F.conv2d(x, w, b, 2, 1), atol=1e-12)
        assert y.is_contiguous(memory_format=CL) == last and y.is_contiguous() != last
    # one input channel: a contiguous [N, 1, H, W] counts as channels-last-contiguous too, but
    # only explicit channels-last strides make oneDNN keep the format for the next layer
    y = kernels.conv2d(big[:, :1].contiguous(), w[:, :1], padding=1)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    # under torch.func transforms the default layout is kept
    y = torch.func.vmap(lambda t: kernels.conv2d(t, w, b, 2, 1))(big[None])[0]
    assert torch.allclose(y, F.conv2d(big, w, b, 2, 1), atol=1e-12) and y.is_contiguous()
    grad = torch.func.grad(lambda t: kernels.conv2d(t, w, b, 2, 1).sum())(big)
    assert grad.is_contiguous()


@pytest.mark.parametrize(
    ("stride", "padding", "layout", "needs"),
    [
        (2, 1, CL, "xwb"),
        (1, 1, torch.contiguous_format, "xwb"),
        (2, 0, CL, "wb"),  # a first layer: the images need no gradient
        (1, 1, torch.contiguous_format, "x"),
    ],
)
def test_conv2d_backward_is_exact_to_the_third_order(gen, stride, padding, layout, needs):
    """The kernel's own backward (one convolution_backward call at first order; under
    create_graph a function whose double backward uses the forward and backward kernels)
    against finite differences, and three orders of gradients against F.conv2d."""
    x = torch.randn(3, 4, 7, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    out = F.conv2d(x, w, b, stride, padding)
    r = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    tensors = {"x": x, "w": w, "b": b}
    for name, t in tensors.items():
        t.requires_grad_(name in needs)
    inputs = [tensors[n] for n in needs]

    def loss(*args, conv=kernels.conv2d):
        given = dict(zip(needs, args, strict=True))
        xx, ww, bb = (given.get(n, tensors[n]) for n in "xwb")
        return (conv(xx, ww, bb, stride, padding) * r).sin().sum()

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)
    orders = {}
    for label, conv in (("ours", kernels.conv2d), ("torch", F.conv2d)):
        g1 = torch.autograd.grad(loss(*inputs, conv=conv), inputs, create_graph=True)
        g2 = torch.autograd.grad(sum((g.sin()).sum() for g in g1), inputs, create_graph=True)
        g3 = torch.autograd.grad(sum((g * g).sum() for g in g2), inputs)
        orders[label] = [*g1, *g2, *g3]
    for a, c in zip(orders["ours"], orders["torch"], strict=True):
        assert torch.allclose(a, c, rtol=1e-9, atol=1e-12)
    # autograd records the kernel's function; a forward-only pass stays F.conv2d's
    assert type(kernels.conv2d(x, w, b, stride, padding).grad_fn).__name__ == "_Conv2dBackward"
    with torch.no_grad():
        assert kernels.conv2d(x, w, b, stride, padding).grad_fn is None


def test_kernels_are_the_reference_layers_off_the_cpu():
    """``kernels='cpu'`` is a no-op on other devices (here the meta device, which computes
    shapes only): the default layout and torch's own autograd nodes."""
    x = torch.empty(8, 3, 24, 24, device="meta", requires_grad=True)
    w = torch.empty(5, 3, 3, 3, device="meta", requires_grad=True)
    y = kernels.conv2d(x, w, None, 1, 1)
    assert y.is_contiguous() and not y.is_contiguous(memory_format=CL)
    scale = torch.empty(5, device="meta", requires_grad=True)
    z, _, _ = kernels.batch_norm(y.contiguous(memory_format=CL), scale, scale)
    assert not any(name.startswith("_") for name in graph_nodes([y, z]))


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------


def test_batch_norm_on_channels_last_input_matches_the_reference(gen):
    x = torch.randn(6, 4, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1
    weight = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    stats = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    nodes = set()
    for grad in (False, True):  # forward only: the reference on the rows; recorded: the kernel
        inputs = [t.detach().requires_grad_(grad) for t in (x, weight, bias)]
        for training in (True, False):
            ref = batch_norm(*inputs, *stats, training=training)
            ours = kernels.batch_norm(
                inputs[0].to(memory_format=CL), *inputs[1:], *stats, training=training
            )
            assert ours[0].is_contiguous(memory_format=CL)
            for a, b in zip(ours, ref, strict=True):
                assert torch.allclose(a, b, atol=1e-12)
            nodes |= graph_nodes([ours[0]])
    assert "_RowBatchNormBackward" in nodes


@pytest.mark.parametrize("threads", [2, 3])
def test_column_sum_by_slabs_of_rows_is_the_sum(gen, threads, intra_op_threads):
    """Batch norm's row sums (one slab of rows per intra-op thread, the rest added after)
    equal ``sum(0)`` for row counts below, at and off a multiple of the thread count."""
    with intra_op_threads(threads):
        for rows in (1, 2, 5, 6, 7, 27, 1001):
            x = torch.randn(rows, 8, generator=gen, dtype=torch.float64)
            assert torch.allclose(kernels.column_sum(x), x.sum(0), rtol=1e-13, atol=1e-13), rows


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_on_channels_last_input_is_exact_to_the_third_order(
    gen, affine, threads, intra_op_threads
):
    """The kernel's own backward (fused kernel at first order, recomputed statistics under
    create_graph) against finite differences, and three orders of gradients against batch norm
    written out from mean, var and rsqrt (27 rows: with two threads, two slabs of 13 and one
    row left over)."""
    with intra_op_threads(threads):
        x = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
        weight = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5) if affine else None
        bias = torch.randn(4, generator=gen, dtype=torch.float64) if affine else None
        r = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64)
        wb = (weight, bias)

        def written_out(t, w, b):
            y = (t - t.mean((0, 2, 3), keepdim=True)) * torch.rsqrt(
                t.var((0, 2, 3), correction=0, keepdim=True) + 1e-5
            )
            return y if w is None else y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)

        def ours(t, w, b):
            return kernels.batch_norm(t.contiguous(memory_format=CL), w, b)[0]

        def loss(t, *p, bn=ours):
            return (bn(t, *(p or wb)) * r).square().sum()

        inputs = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
        assert torch.autograd.gradcheck(loss, inputs)
        assert torch.autograd.gradgradcheck(loss, inputs)
        orders = {}
        for name, bn in (("ours", ours), ("written out", written_out)):
            g1 = torch.autograd.grad(loss(*inputs, bn=bn), inputs, create_graph=True)
            g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), inputs, create_graph=True)
            g3 = torch.autograd.grad(sum((g * g).sum() for g in g2), inputs)
            orders[name] = [*g1, *g2, *g3]
        for a, b in zip(orders["ours"], orders["written out"], strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        # the second order unrecorded (second-order MAML's case): the closed-form double
        # backward from the forward's statistics, not the recomputed ones
        g1 = torch.autograd.grad(loss(*inputs), inputs, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), inputs)
        k = len(inputs)
        for a, b in zip(g2, orders["written out"][k : 2 * k], strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        # the graph of the first gradients holds the closed-form node
        assert "_RowBatchNormGradsBackward" in graph_nodes(g1)


def test_batch_norm_on_channels_last_input_is_accurate_in_float32(gen):
    """torch's fused CPU kernel for this layout sums each channel in one float32 running sum
    (1.5e-6 to 3.6e-6 relative error here, at 60,000 pixels per channel, which second-order
    inner steps amplify); the kernel sums pairwise (1e-7 to 2e-7)."""
    x64 = torch.randn(600, 16, 10, 10, generator=gen, dtype=torch.float64) * 2 + 1
    w64 = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
    b64 = torch.randn(16, generator=gen, dtype=torch.float64)
    r = torch.randn(600, 16, 10, 10, generator=gen, dtype=torch.float64)

    def grads(x, w, b):
        x = x.to(memory_format=CL).requires_grad_()
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        y = kernels.batch_norm(x, w, b)[0]
        gx, gw = torch.autograd.grad((y * r.to(y)).sum(), (x, w), create_graph=True)
        second = (gx * r.to(y)).sum() + gw.square().sum()
        return [t.detach() for t in (y, gx, gw, *torch.autograd.grad(second, (x, w)))]

    ref = grads(x64, w64, b64)
    ours = grads(x64.float(), w64.float(), b64.float())
    for a, b in zip(ours, ref, strict=True):
        assert float((a.double() - b).norm() / b.norm()) < 5e-7


def test_batch_norm_on_channels_last_input_under_bfloat16_autocast(gen):
    """Under CPU autocast a convolution gives bfloat16 activations with float32 batch-norm
    parameters: the kernel returns the dtype and values torch's kernel does, and both backward
    passes run (float32 statistics, as torch's mixed-dtype kernel keeps them)."""
    x = (torch.randn(8, 4, 9, 9, generator=gen) * 2 + 1).bfloat16().to(memory_format=CL)
    weight = (torch.rand(4, generator=gen) + 0.5).requires_grad_()
    bias = torch.randn(4, generator=gen).requires_grad_()
    x.requires_grad_()
    ref = F.batch_norm(x.detach().contiguous(), None, None, weight, bias, True)
    y = kernels.batch_norm(x, weight, bias)[0]
    assert y.dtype == ref.dtype == torch.bfloat16
    assert torch.allclose(y.float(), ref.float(), atol=0.05)
    gx, gw = torch.autograd.grad(y.float().square().sum(), (x, weight), create_graph=True)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    second = torch.autograd.grad(gw.square().sum() + gx.float().square().sum(), (x, weight, bias))
    first = torch.autograd.grad(kernels.batch_norm(x, weight, bias)[0].float().sum(), (x, weight))
    assert all(torch.isfinite(g.float()).all() for g in (*second, *first))


# ---------------------------------------------------------------------------------------------
# The models' kernels option
# ---------------------------------------------------------------------------------------------


def test_cpu_kernels_convert_passes_of_enough_pixels(gen, monkeypatch):
    """``conv4(kernels='cpu')``: every convolution of a pass with at least
    CHANNELS_LAST_MIN_PIXELS input pixels runs on channels-last input (MAML's 6-image query
    passes here), smaller passes (its 3-image support passes) keep the default layout, and the
    meta-gradient is the reference's in float64; the reference model keeps the default layout
    everywhere."""
    from metafunc.algorithms import MAML

    x = torch.randn(2, 6, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(2).expand(2, 6).clone()
    batch = TaskBatch(x[:, :3], y[:, :3], x, y)
    grads, seen = {}, {}
    conv = F.conv2d

    def spy(images, *a, **k):
        seen[choice].append((images.shape[0], images.stride(1) == 1))  # channels-last strides
        return conv(images, *a, **k)

    monkeypatch.setattr(F, "conv2d", spy)
    for choice in ("cpu", "reference"):
        seen[choice] = []
        alg = MAML(
            conv4(3, hidden=6, kernels=choice), inner_steps=2, strategy="loop",
            shared_first_step=False,
        )  # fmt: skip
        meta = alg.init(torch.Generator().manual_seed(0), dtype=torch.float64)
        grads[choice] = alg.meta_grad(meta, batch)[0]
    assert 3 * 28 * 28 < kernels.CHANNELS_LAST_MIN_PIXELS <= 6 * 28 * 28
    assert set(seen["cpu"]) == {(3, False), (6, True)}
    assert seen["reference"] and not any(last for _, last in seen["reference"])
    err = tree.global_norm(tree.sub(grads["cpu"], grads["reference"]))
    assert float(err / tree.global_norm(grads["reference"])) <= 1e-10


def _second_order_task_grad(model, params, x):
    y = torch.arange(3).repeat(2)
    inner = adapt(lambda p, t: F.cross_entropy(model.apply(p, t[0]), y), optim.sgd(0.3), 2)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    fast, _ = inner(leaves, (x, y))
    loss = F.cross_entropy(model.apply(fast, x.flip(0)), y)
    return torch.autograd.grad(loss, list(leaves.values()))


@pytest.mark.parametrize("name", ["conv4-stride", "conv4-maxpool", "resnet12"])
def test_cpu_kernels_give_the_reference_models_values_and_gradients(gen, name):
    """``kernels='cpu'`` changes speed, not results: outputs, running statistics and a
    second-order MAML gradient equal the reference model's in float64 (6-image passes of at
    least CHANNELS_LAST_MIN_PIXELS pixels, so channels-last with the kernels' own backward
    functions, which the reference model's graph does not hold), and the inner loop's gradients
    come back contiguous."""
    make, x = {
        "conv4-stride": (
            lambda k: conv4(3, hidden=6, kernels=k),
            torch.randn(6, 1, 28, 28, generator=gen),
        ),
        "conv4-maxpool": (
            lambda k: conv4(
                3, in_channels=3, hidden=6, pooling="maxpool", image_size=32, kernels=k
            ),
            torch.randn(6, 3, 32, 32, generator=gen),
        ),
        "resnet12": (
            lambda k: resnet12(3, channels=(4, 6, 8, 10), kernels=k),
            torch.randn(6, 3, 28, 28, generator=gen),
        ),
    }[name]
    x = x.double()
    reference, cpu = make("reference"), make("cpu")
    assert cpu.name == f"{reference.name}-cpu-kernels"
    params = reference.init(gen, dtype=torch.float64)
    state = reference.init_state(dtype=torch.float64)
    for training in (True, False):
        (a, sa), (b, sb) = (
            m.apply(params, x, state=state, training=training) for m in (reference, cpu)
        )
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
        for k in sa:
            assert torch.allclose(sa[k], sb[k], rtol=1e-10, atol=1e-12), k
    ref = _second_order_task_grad(reference, params, x)
    ours = _second_order_task_grad(cpu, params, x)
    err = tree.global_norm(tree.sub(list(ours), list(ref))) / tree.global_norm(list(ref))
    assert float(err) <= 1e-10
    inner_grads, _ = grad_with_aux(
        lambda p: (F.cross_entropy(cpu.apply(p, x), torch.arange(3).repeat(2)), None), params
    )
    assert all(g.is_contiguous() for g in inner_grads.values())
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    nodes = {}
    for label, model in (("reference", reference), ("cpu", cpu)):
        loss = F.cross_entropy(model.apply(leaves, x), torch.arange(3).repeat(2))
        first = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        nodes[label] = graph_nodes(first)
    assert not any(n.startswith("_") for n in nodes["reference"])
    assert {"_Conv2dBackward", "_ConvGradsBackward", "_RowBatchNormGradsBackward"} <= nodes["cpu"]
