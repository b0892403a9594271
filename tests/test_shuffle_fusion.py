"""Channel shuffles (Reshape -> Transpose -> Reshape) rewritten as channel Gathers: bit-identical outputs, fewer
nodes, and nothing rewritten that is not exactly a shuffle."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_builders import GraphBuilder, random_feeds, run
from onnxopt.modelio import to_proto
from onnxopt.passes import NormalizePass
from onnxopt.passes.shuffle_fusion import fuse_channel_shuffles

C, H = 8, 4


def _shuffle_net(*, groups: int = 2, perm: tuple[int, ...] = (0, 2, 1, 3, 4), slices: bool = True,
                 direct_use: bool = False, leak_transpose: bool = False) -> onnx.ModelProto:
    """conv -> channel shuffle -> (two channel Slices, each conv'd | the shuffled tensor conv'd) -> Concat."""
    b = GraphBuilder(seed=1)
    x = b.node("Relu", [b.conv(b.input("input", ["N", 3, H, H]), 3, C)])
    y = b.node("Reshape", [x, b.weight("split_shape", np.array([-1, groups, C // groups, H, H], dtype=np.int64))])
    t = b.node("Transpose", [y], perm=list(perm))
    z = b.node("Reshape", [t, b.weight("merge_shape", np.array([-1, C, H, H], dtype=np.int64))])
    outs = []
    if slices:
        for start, stop in ((0, C // 2), (C // 2, C)):
            bounds = [b.weight(b.fresh("s"), np.array([v], dtype=np.int64)) for v in (start, stop, 1)]
            outs.append(b.conv(b.node("Slice", [z, *bounds]), C // 2, 4))
    if direct_use:
        outs.append(b.conv(z, C, 4))
    b.node("Concat", outs, ["out"], axis=1)
    b.output("out", ["N", 4 * len(outs), H, H])
    if leak_transpose:
        b.output(t, ["N", C // groups, groups, H, H])
    model = b.build()
    onnx.checker.check_model(model, full_check=True)
    return model


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.common.ShapeInferencePass()(ir_model)
    counts = fuse_channel_shuffles(ir_model.graph)
    out = to_proto(ir_model)
    onnx.checker.check_model(out, full_check=True)
    return out, counts


def _assert_identical(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    feeds = random_feeds(a, batch=3, seed=2)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        assert np.array_equal(x, y)  # a Gather copies values: bit-identical, not merely close


@pytest.mark.parametrize("groups", [2, 4])
def test_shuffle_and_its_slices_become_gathers(groups: int) -> None:
    model = _shuffle_net(groups=groups)
    fused, counts = _fused(model)
    assert counts == {"shuffles": 1, "slices": 2}
    ops = Counter(n.op_type for n in fused.graph.node)
    assert ops["Gather"] == 2 and not ops["Reshape"] and not ops["Transpose"] and not ops["Slice"]
    _assert_identical(model, fused)


def test_shuffle_read_whole_and_sliced_keeps_one_full_gather() -> None:
    model = _shuffle_net(direct_use=True)
    fused, counts = _fused(model)
    assert counts == {"shuffles": 1, "slices": 2}
    assert Counter(n.op_type for n in fused.graph.node)["Gather"] == 3
    _assert_identical(model, fused)


def test_not_a_shuffle_is_left_alone() -> None:
    for model in (_shuffle_net(perm=(0, 1, 2, 4, 3)),  # swaps the spatial axes, not the channel groups
                  _shuffle_net(leak_transpose=True)):  # an intermediate is a graph output
        fused, counts = _fused(model)
        assert counts == {"shuffles": 0, "slices": 0}
        assert Counter(n.op_type for n in fused.graph.node)["Transpose"] == 1


def test_normalize_fuses_shuffles_unless_told_not_to() -> None:
    model = _shuffle_net()
    step = NormalizePass()
    normalized = step.apply(model)
    assert step.details["fused_shuffles"] == {"shuffles": 1, "slices": 2, "nodes_folded": 0}
    assert any("channel shuffles" in note for note in step.notes)
    assert not any(n.op_type == "Transpose" for n in normalized.graph.node)
    _assert_identical(model, normalized)
    kept = NormalizePass(fuse_shuffles=False).apply(model)
    assert sum(n.op_type == "Transpose" for n in kept.graph.node) == 1


def _gather_chain(*, same_source: bool = True, identity: bool = False) -> onnx.ModelProto:
    """What depth pruning leaves of a ShuffleNet unit without its branch: halves gathered, concatenated, gathered."""
    b = GraphBuilder(seed=3)
    x = b.node("Relu", [b.conv(b.input("input", ["N", 3, H, H]), 3, C)])
    other = b.node("Relu", [b.conv("input", 3, C)])
    perm = np.arange(C) if identity else np.arange(C).reshape(2, C // 2).T.reshape(-1)
    halves = [b.node("Gather", [x if i == 0 or same_source else other,
                                b.weight(b.fresh("idx"), perm[i * C // 2:(i + 1) * C // 2].astype(np.int64))], axis=1)
              for i in range(2)]
    y = b.node("Concat", halves, axis=1)
    y = b.node("Gather", [y, b.weight("shuffle", perm.astype(np.int64))], axis=1)
    b.node("Conv", [y, b.weight("w_out", (4, C, 1, 1))], ["out"])
    b.output("out", ["N", 4, H, H])
    return b.build()


@pytest.mark.parametrize("identity", [False, True])
def test_gather_chains_compose_into_one_gather(identity: bool) -> None:
    model = _gather_chain(identity=identity)
    ir_model = ir.serde.deserialize_model(model)
    ir.passes.common.ShapeInferencePass()(ir_model)
    from onnxopt.passes.shuffle_fusion import fold_channel_gathers

    saved = fold_channel_gathers(ir_model.graph)
    folded = to_proto(ir_model)
    onnx.checker.check_model(folded, full_check=True)
    gathers = Counter(n.op_type for n in folded.graph.node)["Gather"]
    assert (saved, gathers) == ((4, 0) if identity else (3, 1))
    assert not any(n.op_type == "Concat" for n in folded.graph.node)
    _assert_identical(model, folded)


def test_gathers_of_different_tensors_are_not_folded() -> None:
    model = _gather_chain(same_source=False)
    normalized = NormalizePass().apply(model)
    assert Counter(n.op_type for n in normalized.graph.node)["Gather"] == 3
    _assert_identical(model, normalized)
