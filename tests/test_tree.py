"""metafunc.tree against explicit, hand-written computations on nested dict/list/NamedTuple trees.

The references here never go through optree: `_manual_map` walks dicts, lists and NamedTuples by
hand, so a bug in how metafunc.tree drives optree (wrong argument order, lost NamedTuple type,
reordered leaves) shows up as a mismatch.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, NamedTuple

import optree
import pytest
import torch

import metafunc.tree as mt


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


def _manual_map(fn: Any, *trees: Any) -> Any:
    """A hand-written tree map over dict/list/NamedTuple, independent of optree."""
    head = trees[0]
    if isinstance(head, torch.Tensor):
        return fn(*trees)
    if isinstance(head, dict):
        return {k: _manual_map(fn, *(t[k] for t in trees)) for k in head}
    if isinstance(head, tuple) and hasattr(head, "_fields"):
        return type(head)(*(_manual_map(fn, *parts) for parts in zip(*trees, strict=True)))
    if isinstance(head, list):
        return [_manual_map(fn, *parts) for parts in zip(*trees, strict=True)]
    raise TypeError(type(head))


def _manual_leaves(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _manual_map(out.append, tree)
    return out


def _assert_tree_equal(actual: Any, expected: Any, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Structure (including container types) first, then every leaf."""
    assert optree.tree_structure(actual) == optree.tree_structure(expected)
    assert type(actual) is type(expected)
    for a, e in zip(optree.tree_leaves(actual), optree.tree_leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def _random_tree(gen: torch.Generator, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {"a": [r(3), Pair(r(2, 2), r(4))], "b": {"c": r(2, 3), "d": r(())}}


@pytest.fixture
def xy(gen: torch.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    return _random_tree(gen), _random_tree(gen)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def test_paths_name_leaves_in_flattening_order(xy: tuple[Any, Any]) -> None:
    x, _ = xy
    # NamedTuple fields are named by position, like list entries.
    assert mt.paths(x) == ["a.0", "a.1.0", "a.1.1", "b.c", "b.d"]
    flat = mt.flatten_with_paths(x)
    assert list(flat) == mt.paths(x)
    assert flat["a.1.1"] is x["a"][1].second
    assert flat["b.d"] is x["b"]["d"]


def test_flat_dotted_keys_and_nested_dicts_have_the_same_paths() -> None:
    w = torch.zeros(2)
    assert mt.paths({"head.weight": w}) == mt.paths({"head": {"weight": w}}) == ["head.weight"]


def test_flatten_with_paths_rejects_two_leaves_with_one_path() -> None:
    # {'a.b': x} and {'a': {'b': y}} both name their leaf 'a.b'; a flat dict would keep one and
    # partition/combine would then silently put the same tensor in both places.
    tree = {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}}
    with pytest.raises(ValueError, match=r"'a\.b'"):
        mt.flatten_with_paths(tree)


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


def test_add_sub_scale_axpy_match_manual(xy: tuple[Any, Any]) -> None:
    x, y = xy
    a = 0.37
    _assert_tree_equal(mt.add(x, y), _manual_map(lambda u, v: u + v, x, y))
    _assert_tree_equal(mt.sub(x, y), _manual_map(lambda u, v: u - v, x, y))
    _assert_tree_equal(mt.scale(a, x), _manual_map(lambda u: a * u, x))
    _assert_tree_equal(mt.axpy(a, x, y), _manual_map(lambda u, v: a * u + v, x, y))
    # The NamedTuple type survives, not just its leaves.
    assert isinstance(mt.add(x, y)["a"][1], Pair)


def test_scale_and_axpy_differentiate_through_a_tensor_factor(xy: tuple[Any, Any]) -> None:
    x, y = xy
    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mt.vdot(mt.axpy(a, x, y), mt.ones_like(x)), a)
    expected = sum(leaf.sum() for leaf in _manual_leaves(x))
    torch.testing.assert_close(grad, expected)


def test_vdot_and_global_norm_match_one_flat_vector(xy: tuple[Any, Any]) -> None:
    x, y = xy
    vx = torch.cat([t.reshape(-1) for t in _manual_leaves(x)])
    vy = torch.cat([t.reshape(-1) for t in _manual_leaves(y)])
    assert vx.numel() == 3 + 4 + 4 + 6 + 1
    torch.testing.assert_close(mt.vdot(x, y), torch.dot(vx, vy), rtol=1e-12, atol=0)
    torch.testing.assert_close(mt.global_norm(x), torch.linalg.vector_norm(vx), rtol=1e-12, atol=0)
    assert mt.vdot(x, y).shape == mt.global_norm(x).shape == ()


def test_vdot_and_global_norm_reject_empty_trees() -> None:
    with pytest.raises(ValueError, match="no leaves"):
        mt.vdot({}, {})
    with pytest.raises(ValueError, match="no leaves"):
        mt.global_norm([])


def test_zeros_like_ones_like_keep_structure_dtype_and_shape(gen: torch.Generator) -> None:
    x = _random_tree(gen, torch.float32)
    _assert_tree_equal(mt.zeros_like(x), _manual_map(lambda u: torch.zeros(u.shape), x))
    _assert_tree_equal(mt.ones_like(x), _manual_map(lambda u: torch.ones(u.shape), x))


def test_cast_changes_floating_leaves_and_keeps_integer_ones(gen: torch.Generator) -> None:
    x = _random_tree(gen, torch.float32)
    x["labels"] = torch.arange(4)
    out = mt.cast(x, torch.float64)
    expected = _manual_map(lambda u: u.double() if u.is_floating_point() else u, x)
    _assert_tree_equal(out, expected)
    assert out["labels"].dtype == torch.int64
    every = mt.cast(x, torch.float64, floating_only=False)
    assert every["labels"].dtype == torch.float64
    torch.testing.assert_close(every["labels"], torch.arange(4, dtype=torch.float64))


def test_cast_moves_every_leaf_to_a_device(gen: torch.Generator) -> None:
    x = _random_tree(gen)
    x["labels"] = torch.arange(4)
    out = mt.cast(x, device="meta")
    assert {leaf.device.type for leaf in _manual_leaves(out)} == {"meta"}
    assert [leaf.dtype for leaf in _manual_leaves(out)] == [
        leaf.dtype for leaf in _manual_leaves(x)
    ]
    both = mt.cast(x, torch.float32, device="meta")
    assert {leaf.device.type for leaf in _manual_leaves(both)} == {"meta"}
    assert both["b"]["c"].dtype == torch.float32 and both["labels"].dtype == torch.int64


def test_detach_cuts_the_graph_and_keeps_values(gen: torch.Generator) -> None:
    x = _manual_map(lambda u: u.requires_grad_(), _random_tree(gen))
    y = mt.scale(2.0, x)
    out = mt.detach(y)
    for leaf, ref in zip(_manual_leaves(out), _manual_leaves(y), strict=True):
        assert not leaf.requires_grad and leaf.grad_fn is None
        torch.testing.assert_close(leaf, ref, rtol=0, atol=0)
    assert optree.tree_structure(out) == optree.tree_structure(x)


def test_allclose_compares_structure_then_values(xy: tuple[Any, Any]) -> None:
    x, y = xy
    assert mt.allclose(x, _manual_map(torch.clone, x))
    assert not mt.allclose(x, y)
    assert not mt.allclose(x, {"a": x["a"]})
    assert mt.allclose(x, mt.add(x, mt.scale(1e-9, mt.ones_like(x))), rtol=0, atol=1e-8)


def test_binary_ops_reject_different_structures_naming_the_paths(xy: tuple[Any, Any]) -> None:
    x, y = xy
    del y["b"]["c"]
    y["b"]["e"] = torch.zeros(2, 3, dtype=torch.float64)
    for op, call in [
        (mt.add, "tree.add"),
        (mt.sub, "tree.sub"),
        (lambda u, v: mt.axpy(2.0, u, v), "tree.axpy"),
        (mt.vdot, "tree.vdot"),
    ]:
        with pytest.raises(ValueError, match=re.escape(call)) as info:
            op(x, y)
        assert "only in x: ['b.c']" in str(info.value)
        assert "only in y: ['b.e']" in str(info.value)


def test_structures_with_the_same_paths_but_different_containers_differ() -> None:
    t = torch.zeros(1)
    with pytest.raises(ValueError, match="different structures"):
        mt.add([t, t], (t, t))


# --------------------------------------------------------------------------------------------
# Task axis
# --------------------------------------------------------------------------------------------


def test_stack_unstack_round_trip(gen: torch.Generator) -> None:
    trees = [_random_tree(gen) for _ in range(3)]
    stacked = mt.stack(trees)
    expected = _manual_map(lambda *ts: torch.stack(ts), *trees)
    _assert_tree_equal(stacked, expected)
    assert stacked["a"][1].first.shape == (3, 2, 2)
    back = mt.unstack(stacked)
    assert len(back) == 3
    for got, ref in zip(back, trees, strict=True):
        _assert_tree_equal(got, ref)


def test_stack_and_unstack_along_another_dim(gen: torch.Generator) -> None:
    trees = [{"w": torch.randn(2, 3, generator=gen)} for _ in range(4)]
    stacked = mt.stack(trees, dim=1)
    assert stacked["w"].shape == (2, 4, 3)
    for got, ref in zip(mt.unstack(stacked, dim=1), trees, strict=True):
        _assert_tree_equal(got, ref)


def test_unstack_rejects_mismatched_leading_sizes() -> None:
    with pytest.raises(ValueError, match=r"different sizes along dim 0: \[2, 3\]"):
        mt.unstack({"a": torch.zeros(2, 4), "b": torch.zeros(3)})
    assert mt.unstack({}) == []


def test_stack_rejects_empty_and_mismatched_trees() -> None:
    with pytest.raises(ValueError, match="empty"):
        mt.stack([])
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"trees\[0\] and trees\[2\].*only in trees\[2\]: \['c'\]"):
        mt.stack([{"a": t}, {"a": t}, {"a": t, "c": t}])


# --------------------------------------------------------------------------------------------
# Partition and combine
# --------------------------------------------------------------------------------------------


@pytest.fixture
def net(gen: torch.Generator) -> dict[str, Any]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "body": {"layers": [{"w": r(3, 2), "b": r(3)}, {"w": r(3, 3), "b": r(3)}]},
        "head": {"weight": r(2, 3), "bias": r(2)},
        # Shares the prefix "head" as a string but not as a path: 'head' must not select it.
        "header": {"scale": r(1, 1)},
    }


ALL_PATHS = {
    "body.layers.0.b",
    "body.layers.0.w",
    "body.layers.1.b",
    "body.layers.1.w",
    "head.bias",
    "head.weight",
    "header.scale",
}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("head", {"head.weight", "head.bias"}),
        ("head.weight", {"head.weight"}),
        ("body.layers.1", {"body.layers.1.w", "body.layers.1.b"}),
        (re.compile(r".*\.b(ias)?"), {"body.layers.0.b", "body.layers.1.b", "head.bias"}),
        (
            lambda path, leaf: leaf.ndim == 2,
            {p for p in ALL_PATHS if not p.endswith(("b", "bias"))},
        ),
        (["head.weight", "body.layers.0"], {"head.weight", "body.layers.0.w", "body.layers.0.b"}),
        ({"header"}, {"header.scale"}),
    ],
    ids=["prefix", "leaf", "list-prefix", "regex", "predicate", "list", "set"],
)
def test_partition_then_combine(net: dict[str, Any], where: Any, expected: set[str]) -> None:
    assert set(mt.paths(net)) == ALL_PATHS
    selected, rest, spec = mt.partition(net, where)
    assert set(selected) == expected
    assert set(rest) == ALL_PATHS - expected
    flat = mt.flatten_with_paths(net)
    for path, leaf in {**selected, **rest}.items():
        assert leaf is flat[path]
    assert mt.select(net, where) == [p for p in mt.paths(net) if p in expected]
    for parts in [(selected, rest), (rest, selected)]:
        back = mt.combine(*parts, spec)
        assert optree.tree_structure(back) == optree.tree_structure(net)
        for got, ref in zip(optree.tree_leaves(back), optree.tree_leaves(net), strict=True):
            assert got is ref


def test_combine_puts_new_leaves_in_place(net: dict[str, Any]) -> None:
    head, body, spec = mt.partition(net, "head")
    new_head = {p: torch.full_like(v, 7.0) for p, v in head.items()}
    out = mt.combine(new_head, body, spec)
    assert torch.equal(out["head"]["weight"], torch.full((2, 3), 7.0))
    assert out["body"]["layers"][1]["w"] is net["body"]["layers"][1]["w"]


def test_regex_must_match_the_whole_path(net: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="selects no leaf"):
        mt.partition(net, re.compile("head"))


def test_partition_selecting_nothing_lists_available_paths(net: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"tree\.partition") as info:
        mt.partition(net, "heads")
    message = str(info.value)
    assert "'heads' selects no leaf" in message
    for path in ALL_PATHS:
        assert path in message


def test_partition_rejects_a_filter_of_the_wrong_type(net: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="where is a int"):
        mt.partition(net, 3)


def test_combine_rejects_a_missing_part_and_a_missing_spec(net: dict[str, Any]) -> None:
    head, _body, spec = mt.partition(net, "head")
    with pytest.raises(ValueError, match=r"no leaf for \['body\.layers\.0\.b'"):
        mt.combine(head, spec)
    with pytest.raises(TypeError, match="last argument must be the spec"):
        mt.combine(head, _body)


# --------------------------------------------------------------------------------------------
# validate
# --------------------------------------------------------------------------------------------


class Opaque:
    pass


def _params(**head: Any) -> dict[str, Any]:
    return {"body": {"w": torch.zeros(2, 2)}, "head": {"weight": torch.zeros(2), **head}}


def test_validate_accepts_dicts_lists_namedtuples_and_ordered_dicts() -> None:
    tree = OrderedDict(
        a=[torch.zeros(1), Pair(torch.zeros(2), torch.ones(2))], b={"c": torch.ones(())}
    )
    assert mt.validate(tree, call="f(params)") is None
    assert mt.validate({"n": torch.arange(3)}, call="f(params)", floating=False) is None


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (None, "is None"),
        (3, "is a int"),
        (Opaque(), "is a Opaque"),
        ({torch.zeros(1)}, "is a set"),
    ],
    ids=["none", "int", "custom-class", "set"],
)
def test_validate_names_the_path_of_a_non_tensor_leaf(bad: Any, what: str) -> None:
    params = _params()
    params["head"]["weight"] = bad
    with pytest.raises(TypeError) as info:
        mt.validate(params, call="adapt(...)")
    message = str(info.value)
    assert message.startswith("adapt(...): params['head']['weight'] ")
    assert what in message


def test_validate_names_paths_inside_lists_and_namedtuples() -> None:
    tree = {"a": [torch.zeros(1), Pair(torch.zeros(1), None)]}  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("grads['a'][1].second is None")):
        mt.validate(tree, call="f()", name="grads")


def test_validate_rejects_integer_tensors_and_its_fix_works() -> None:
    params = _params(steps=torch.arange(2))
    with pytest.raises(TypeError) as info:
        mt.validate(params, call="adapt(...)")
    message = str(info.value)
    assert "params['head']['steps']" in message
    assert "torch.int64" in message
    # The message shows a fix in code; running that fix must make the tree valid.
    fix = re.search(r"params = (metafunc\.tree\.cast\(.*?\))", message)
    assert fix is not None, message
    fixed = eval(
        fix.group(1), {"metafunc": __import__("metafunc"), "torch": torch, "params": params}
    )
    mt.validate(fixed, call="adapt(...)")


def test_validate_rejects_leaves_on_two_devices_and_its_fix_works() -> None:
    params = {"a": torch.zeros(2, device="meta"), "head": {"weight": torch.zeros(2)}}
    with pytest.raises(ValueError) as info:
        mt.validate(params, call="adapt(...)")
    message = str(info.value)
    assert "params['head']['weight'] is on cpu but params['a'] is on meta" in message
    fix = re.search(r"(metafunc\.tree\.cast\(.*?\))\.", message)
    assert fix is not None, message
    fixed = eval(fix.group(1), {"metafunc": __import__("metafunc"), "params": params})
    mt.validate(fixed, call="adapt(...)")
    mt.validate(params, call="adapt(...)", device=False)


def test_validate_rejects_non_string_keys_and_empty_trees() -> None:
    with pytest.raises(TypeError, match=r"params\['head'\] has a non-string key 0"):
        mt.validate({"head": {0: torch.zeros(1)}}, call="f()")
    with pytest.raises(ValueError, match="no tensor leaves"):
        mt.validate({"a": []}, call="f()")


def test_mismatched_trees_fail_under_torch_compile_too():
    """Where dynamo cannot trace the structure check (torch < 2.14) it stands aside, and the
    arithmetic itself must still refuse mismatched trees rather than pair leaves by position."""
    x = {"w": torch.ones(3), "b": torch.ones(2)}
    y = {"w": torch.ones(3), "c": torch.ones(2)}
    with pytest.raises(ValueError, match=r"tree.vdot\(x, y\).*only in x: \['b'\]"):
        mt.vdot(x, y)
    compiled = torch.compile(lambda a, b: mt.vdot(a, b), fullgraph=True, backend="eager")
    with pytest.raises(Exception):  # noqa: B017 (dynamo wraps the error its own way)
        compiled(x, y)
